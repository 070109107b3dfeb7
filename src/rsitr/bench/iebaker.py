"""iEBAKER ablation: baseline vs +EBA vs +KER vs +SAR vs all, with one budget, from one call.

``run_ablation(data_path, out_dir, ...)`` trains the five variants with the shared loop (method
``iebaker`` with the parts switched on or off; "baseline" is the same method with all parts off,
i.e. symmetric InfoNCE), the same steps/epochs/time budget and seeds, and evaluates each best
checkpoint on the test split. When the annotation marks noisy training captions (the synthetic
benchmark's ``"noisy": true``, written by ``rsitr data synth --noise-frac F``), the EBA runs are
also scored as a noise filter: precision and recall of the pairs EBA eliminated (read back from
the ``eba_epoch{N}.tsv`` files the method writes), and the ROC-AUC of the final model's pair score
as a noise detector with precision/recall at a few elimination fractions.

Outputs under ``out_dir``: one run folder per ``seed{S}/{variant}`` (resumed / skipped when run
again), ``ablation.json`` (all rows + summary) and ``ablation.md`` (the tables).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsitr.bench import report
from rsitr.models.registry import parse_spec
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "+EBA": {"eba": True},
    "+KER": {"ker": True},
    "+SAR": {"sar": True},
    "all": {"eba": True, "ker": True, "sar": True},
}
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")


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


def _score_train_pairs(run_dir: Path, train_ds, cache_dir: Path | None) -> np.ndarray:
    """Global similarity of every training pair under the run's best checkpoint."""
    import torch
    import torch.nn.functional as F

    from rsitr.methods.factory import load_model
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.data.imagesets import build_trunk_cache, make_transforms, supports_trunk_cache

    model = load_model(str(run_dir / "checkpoint_best.pt"))
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


def run_ablation(
    data_path: str | Path,
    out_dir: str | Path,
    backbone: str = "towers:efficientnet-lite0+minilm-l6",
    *,
    epochs: int = 10,
    max_steps: int | None = None,
    time_budget: float | None = None,
    seeds: Sequence[int] = (0,),
    variants: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    mode: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train and test the iEBAKER ablation variants; returns one row per (variant, seed) with the
    test metrics (percent), wall time, steps, and for EBA runs the filter's precision/recall
    against the annotation's noisy flags. Also writes ``ablation.json`` / ``ablation.md``.

    ``epochs`` / ``max_steps`` / ``time_budget``: the same budget for every variant.
    ``options``: iEBAKER options shared by all variants (e.g. ``{"eba_fraction": 0.2}``);
    ``overrides``: extra TrainConfig overrides (dotted keys); ``mode``: model.mode (default
    ``full`` for ``clip:`` backbones, the config default otherwise).
    """
    from rsitr.data.captions import load_dataset
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(variants) if variants else list(VARIANTS)
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise RsitrError(f"unknown variant(s) {bad}; available: {list(VARIANTS)}")
    shared = {"eba_fraction": 0.2, **(options or {})}
    data = load_dataset(str(data_path))
    train_ds = data.split("train")
    noisy = noisy_flags(data_path, train_ds)
    if noisy is None:
        log.info("%s marks no noisy captions: EBA precision/recall not measured", data_path)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for v in names:
            run_dir = out / f"seed{seed}" / v.replace("+", "plus-")
            opts = {**shared, **VARIANTS[v]}
            ov: dict[str, Any] = {
                "data.path": str(data_path), "out_dir": str(run_dir), "model.backbone": backbone, "epochs": int(epochs),
                "max_steps": max_steps, "time_budget": time_budget, "seed": int(seed), "cache_dir": str(out / "cache"),
                "method.name": "iebaker", "method.options": opts,
            }
            if mode or parse_spec(backbone).family == "clip":
                ov["model.mode"] = mode or "full"
            ov.update(overrides or {})
            cfg = TrainConfig().override(ov)
            res_path = run_dir / "result.json"
            t0 = time.perf_counter()
            if res_path.is_file() and (run_dir / "checkpoint_best.pt").is_file():
                res = json.loads(res_path.read_text())
                test, hist, seconds = res["test"], res.get("history", []), res.get("seconds")
                log.info("%s seed %d: done (skipped)", v, seed)
            else:
                log.info("%s seed %d: training ...", v, seed)
                r = train(cfg, resume=(run_dir / "checkpoint_last.pt").is_file(), progress=progress)
                test, hist, seconds = r.test, r.history, round(r.seconds, 1)
            row: dict[str, Any] = {"variant": v, "seed": int(seed), **{k: (test or {}).get(k) for k in METRICS},
                                   "steps": hist[-1]["global_step"] if hist else None, "seconds": seconds,
                                   "best_epoch": json.loads(res_path.read_text())["best_val"].get("epoch") if res_path.is_file() else None,
                                   "options": opts}
            if opts.get("eba") and noisy is not None:
                per_epoch = eba_files_quality(run_dir, noisy)
                row["eba_epochs"] = per_epoch
                if per_epoch:
                    row.update({f"eba_{k}": per_epoch[-1][k] for k in ("eliminated", "noisy", "precision", "recall")})
                    row["eba_first_precision"], row["eba_first_recall"] = per_epoch[0]["precision"], per_epoch[0]["recall"]
                try:
                    score = _score_train_pairs(run_dir, train_ds, out / "cache")
                    row["noise_auc"] = roc_auc(-score, noisy)
                    curve = {}
                    for f in (0.1, 0.2, 0.3, 0.4):
                        k = int(np.floor(f * len(score)))
                        el = np.zeros(len(score), dtype=bool)
                        el[np.argsort(score, kind="stable")[:k]] = True
                        q = filter_quality(el, noisy)
                        curve[str(f)] = {"precision": q["precision"], "recall": q["recall"]}
                    row["noise_curve"] = curve
                except Exception as exc:  # the measurement is a bonus; never lose the ablation for it
                    log.warning("could not score the training pairs of %s: %s", run_dir, exc)
            log.info("%s seed %d: test mR %.2f (%.0fs)", v, seed, row["mR"] or float("nan"), time.perf_counter() - t0)
            rows.append(row)
    summary = summarize(rows)
    atomic_write_json(out / "ablation.json", {"data": str(data_path), "backbone": backbone, "epochs": epochs, "max_steps": max_steps,
                                              "time_budget": time_budget, "seeds": list(seeds), "options": shared,
                                              "rows": rows, "summary": summary})
    atomic_write_text(out / "ablation.md", format_markdown(rows) + "\n")
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each variant's metrics and filter quality."""
    return report.summarize(rows, "variant", METRICS + ("eba_precision", "eba_recall", "eba_first_precision", "eba_first_recall",
                                                         "noise_auc", "seconds"))


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The ablation table (mean +- std over seeds) and the EBA filter table."""
    summ = summarize(rows)
    n_seeds = max((s["seeds"] for s in summ), default=0)

    def cell(s, k, scale=1.0, d=2):
        if k not in s:
            return "-"
        m = s[k] * scale
        sd = s.get(k + "_std", 0.0) * scale
        return f"{m:.{d}f}" + (f" ± {sd:.{d}f}" if n_seeds > 1 else "")

    lines = ["| variant | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summ:
        lines.append("| " + " | ".join([s["variant"]] + [cell(s, k) for k in METRICS] + [cell(s, "seconds", d=0)]) + " |")
    ebas = [s for s in summ if "eba_recall" in s]
    if ebas:
        lines += ["", "EBA as a noise filter (injected noisy training pairs; last EBA epoch, first EBA epoch, and the final model's pair score):", "",
                  "| variant | precision | recall | first-epoch precision | first-epoch recall | score AUC |", "|---|---:|---:|---:|---:|---:|"]
        for s in ebas:
            lines.append("| " + " | ".join([s["variant"], cell(s, "eba_precision", 100, 1), cell(s, "eba_recall", 100, 1),
                                             cell(s, "eba_first_precision", 100, 1), cell(s, "eba_first_recall", 100, 1),
                                             cell(s, "noise_auc", 1, 3)]) + " |")
    return "\n".join(lines)
