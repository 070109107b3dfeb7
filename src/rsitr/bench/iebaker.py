"""iEBAKER ablation: baseline vs +EBA vs +KER vs +SAR vs all, with one budget -- the suite
``configs/suites/iebaker-ablation.yaml`` run by the one runner (``rsitr bench iebaker`` is its
alias, :mod:`rsitr.cli.bench`) -- and the ``eba_filter`` measurement its report renders.

The variants are method ``iebaker`` with the parts switched on or off ("baseline" is the same
method with all parts off, i.e. symmetric InfoNCE). When the annotation marks noisy training
captions (the synthetic benchmark's ``"noisy": true``, written by ``rsitr data synth --noise-frac
F``), a cell whose method runs EBA is also scored as a noise filter: precision and recall of the
pairs EBA eliminated (read back from the ``eba_epoch{N}.tsv`` files the method writes; the last
and the first EBA epoch), and the ROC-AUC of the final model's pair score as a noise detector with
precision/recall at a few elimination fractions.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rsitr.bench.measurements import CellContext, Measurement, fmt_mean, keyword_check, register_measurement
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

SUITE = "iebaker-ablation"


def noisy_flags(data_path: str | Path, train_ds) -> np.ndarray | None:
    """Per training caption (``train_ds.texts()`` order), whether the annotation marks it noisy;
    None when the file has no ``noisy`` fields (only Karpathy-style JSON carries them)."""
    p = Path(data_path)
    if p.is_dir():
        cands = sorted(p.glob("dataset_*.json"))
        if not cands:
            return None
        p = cands[0]
    if p.suffix.lower() != ".json":
        return None
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        return None
    by_name: dict[str, list[tuple[str, bool]]] = {}
    seen_flag = False
    for im in raw["images"]:
        sents = [(str(s.get("raw", "")).strip(), bool(s.get("noisy", False))) for s in im.get("sentences", [])]
        seen_flag |= any("noisy" in s for s in im.get("sentences", []))
        name = str(im.get("filename", ""))
        by_name[name] = sents
        if im.get("filepath"):
            by_name[f"{im['filepath']}/{name}"] = sents
    if not seen_flag:
        return None
    flags: list[bool] = []
    for e in train_ds.entries:
        sents = by_name.get(e.image_id) or by_name.get(Path(e.image_id).name)
        if sents is None:
            raise RsitrError(f"{p}: image {e.image_id!r} of the training split is not in the annotation")
        texts = [s for s, _ in sents]
        for j, cap in enumerate(e.captions):
            c = cap.strip()
            if j < len(sents) and sents[j][0] == c:
                flags.append(sents[j][1])
            elif c in texts:
                flags.append(sents[texts.index(c)][1])
            else:
                raise RsitrError(f"{p}: caption {cap!r} of image {e.image_id!r} not found in the annotation")
    return np.asarray(flags, dtype=bool)


def filter_quality(eliminated: np.ndarray, noisy: np.ndarray) -> dict[str, float]:
    """Precision / recall of an elimination mask against the known noisy pairs."""
    eliminated, noisy = np.asarray(eliminated, bool), np.asarray(noisy, bool)
    tp = int((eliminated & noisy).sum())
    n_el, n_noisy = int(eliminated.sum()), int(noisy.sum())
    return {"eliminated": n_el, "noisy": n_noisy, "true_positives": tp,
            "precision": tp / n_el if n_el else float("nan"), "recall": tp / n_noisy if n_noisy else float("nan")}


def roc_auc(score_noisy: np.ndarray, noisy: np.ndarray) -> float:
    """AUC of ``score_noisy`` (higher = more likely noisy) separating noisy from clean pairs
    (Mann-Whitney U with average ranks for ties)."""
    score_noisy, noisy = np.asarray(score_noisy, dtype=np.float64), np.asarray(noisy, dtype=bool)
    n1 = int(noisy.sum())
    n0 = len(noisy) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(score_noisy, kind="stable")
    s = score_noisy[order]
    ranks = np.empty(len(s))
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # average of the 1-based ranks a+1 .. b
    return float((ranks[noisy].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def eba_files_quality(run_dir: Path, noisy: np.ndarray) -> list[dict[str, Any]]:
    """Filter quality of each ``eba_epoch{N}.tsv`` of a run (pairs eliminated from the epoch or
    from the global loss count as eliminated)."""
    import csv

    out = []
    files = sorted(run_dir.glob("eba_epoch*.tsv"), key=lambda f: int(f.stem.removeprefix("eba_epoch")))
    for f in files:
        el = np.zeros(len(noisy), dtype=bool)
        with open(f, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                if row["dropped_from"] in ("all", "global"):
                    el[int(row["text_index"])] = True
        out.append({"epoch": int(f.stem.removeprefix("eba_epoch")), **filter_quality(el, noisy)})
    return out


def _score_train_pairs(model, train_ds, cache_dir: Path | None) -> np.ndarray:
    """Global similarity of every training pair under ``model`` (the cell's best checkpoint)."""
    import torch
    import torch.nn.functional as F

    from rsitr.data.imagesets import make_transforms
    from rsitr.models.trunk_cache import build_trunk_cache, supports_trunk_cache
    from rsitr.eval.evaluate import encode_dataset

    for p in model.parameters():  # inference only: frozen trunks can use the run's cached trunk features
        p.requires_grad_(False)
    cache = None
    if cache_dir is not None and supports_trunk_cache(model):
        from rsitr.train.config import AugmentConfig

        eval_tf, _ = make_transforms(model, AugmentConfig(enabled=False))
        cache = build_trunk_cache(model, train_ds, cache_dir=cache_dir, views=1, eval_transform=eval_tf, keep_tokens=False, progress=False)
    enc = encode_dataset(model, train_ds, trunk_cache=cache, progress=False)
    owner = torch.as_tensor(enc.text_to_image)
    return (F.normalize(enc.images, dim=-1)[owner] * enc.texts).sum(-1).numpy()


def eba_enabled(cfg) -> bool:
    """Whether the cell's method runs EBA (iEBAKER, alone or as a part of ``combo``)."""
    opts = cfg.method.options or {}
    if cfg.method.name == "combo":
        opts = (opts.get("parts") or {}).get("iebaker") or {}
    elif cfg.method.name != "iebaker":
        return False
    return bool(opts.get("eba"))


def _eba_on_cell(ctx: CellContext, params: dict[str, Any]) -> dict[str, Any] | None:
    cfg = ctx.cfg
    if not eba_enabled(cfg):
        return None
    train_ds = ctx.data.split(cfg.data.train_split)
    noisy = noisy_flags(cfg.data.path, train_ds)
    if noisy is None:
        log.info("%s marks no noisy captions: EBA precision/recall not measured", cfg.data.path)
        return None
    per_epoch = eba_files_quality(Path(cfg.out_dir), noisy)
    out: dict[str, Any] = {"eba_epochs": per_epoch}
    if per_epoch:
        out.update({f"eba_{k}": per_epoch[-1][k] for k in ("eliminated", "noisy", "precision", "recall")})
        out["eba_first_precision"], out["eba_first_recall"] = per_epoch[0]["precision"], per_epoch[0]["recall"]
    try:
        score = _score_train_pairs(ctx.loaded.backbone, train_ds, Path(cfg.cache_dir) if cfg.cache_dir else None)
    except Exception as exc:  # noqa: BLE001 - the filter's precision/recall above stand without the pair scores
        log.warning("could not score the training pairs of %s: %s", cfg.out_dir, exc)
        out["noise_auc_error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["noise_auc"] = roc_auc(-score, noisy)
    curve = {}
    for f in params.get("fractions") or (0.1, 0.2, 0.3, 0.4):
        k = int(np.floor(float(f) * len(score)))
        el = np.zeros(len(score), dtype=bool)
        el[np.argsort(score, kind="stable")[:k]] = True
        q = filter_quality(el, noisy)
        curve[str(f)] = {"precision": q["precision"], "recall": q["recall"]}
    out["noise_curve"] = curve
    return out


def _eba_render(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["EBA as a noise filter (injected noisy training pairs; last EBA epoch, first EBA epoch, and the final model's pair score):", "",
             "| method | precision | recall | first-epoch precision | first-epoch recall | score AUC |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], fmt_mean(r, "eba_precision", 100, 1), fmt_mean(r, "eba_recall", 100, 1),
                                         fmt_mean(r, "eba_first_precision", 100, 1), fmt_mean(r, "eba_first_recall", 100, 1),
                                         fmt_mean(r, "noise_auc", 1, 3)]) + " |")
    return lines


def _eba_check(params: dict[str, Any]) -> None:
    keyword_check("eba_filter", extra={"fractions": (0.1, 0.2, 0.3, 0.4)})(params)
    fr = params.get("fractions") or ()  # None: the default fractions
    if not all(0 < float(f) <= 1 for f in fr):
        raise RsitrError(f"eba_filter: fractions must be in (0, 1] (shares of the training pairs), got {list(fr)!r}")


EBA_FILTER = register_measurement(Measurement("eba_filter", "EBA filter quality", _eba_render, on_cell=_eba_on_cell, check=_eba_check))
