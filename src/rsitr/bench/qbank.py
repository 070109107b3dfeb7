"""How big a QB-Norm query bank must be (``rsitr bench qbank``): the test mR of a model with its
full training-caption bank, with random subsamples of it, and without one.

A shipped model carries its query bank as package data (:mod:`rsitr.models.shipped`), so its size
matters: the full training captions of UCM + RSICD are ~52k captions, 27 MB in fp16 at 256
dimensions. This measures what a subsample keeps. Everything is encoded once -- each dataset's
test split, and the bank split (captions, and images unless ``bank_images`` is off) of every
dataset -- and only the bank varies, so a size costs a few matrix products.

Rows (each dataset's test split, the protocol's expected ties, one test-time view):

* ``none``: the plain cosine;
* ``own split, captions+images``: each dataset normalised by its own bank split, text->image by
  its captions and image->text by its images (``rsitr models evaluate``'s QB-Norm rows);
* ``full, captions+images``: the bank split of every dataset together, both directions;
* ``full, captions``: every bank caption, text->image only (image->text keeps the plain cosine):
  what a caption bank can do, and all that free-text search uses;
* ``N captions``: ``draws`` random subsets of N of those captions (seeds ``seed``, ``seed+1``,
  ...), mean and spread over the draws.

:func:`choose_size` picks the smallest size whose mean mR is within ``tolerance`` of the full
caption bank on every dataset, and says whether that bank pays at all (gains more than
``tolerance`` over none on some dataset).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

DIRECTIONS = {"mR": ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"), "t2i_mR": ("t2i_r1", "t2i_r5", "t2i_r10"),
              "i2t_mR": ("i2t_r1", "i2t_r5", "i2t_r10")}


@dataclass
class EncodedSet:
    """One dataset encoded for the bench: its test split, and its bank split's captions/images."""

    label: str
    test: Any  # rsitr.eval.evaluate.Encoded of the test split
    bank_texts: torch.Tensor  # [C, D]
    bank_images: torch.Tensor | None  # [I, D], None when not encoded


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` of ``n`` items drawn without replacement by ``seed`` (all of them
    when ``size >= n``): the one rule the bench and a shipped bank's build use."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def parse_data(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``[LABEL=]PATH`` arguments as ``(label, path)`` (label: the path's last part)."""
    out = []
    for s in specs:
        label, sep, path = s.partition("=")
        if not sep:
            label, path = Path(s.rstrip("/")).stem, s
        if not label or not path:
            raise RsitrError(f"--data {s!r}: give PATH or LABEL=PATH")
        out.append((label, path))
    if len({lab for lab, _ in out}) != len(out):
        raise RsitrError("--data labels must differ (give LABEL=PATH)")
    return out


def encode_sets(model, data: Sequence[tuple[str, str]], *, split: str = "test", bank_split: str = "train", bank_images: bool = True,
                engine=None, batch_size: int = 128, progress: bool = True) -> list[EncodedSet]:
    """Encode every dataset's ``split`` and its ``bank_split`` (``model``: a loaded model)."""
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.models.engine import encode_texts

    out = []
    for label, path in data:
        ds = load_dataset(path, split=split)
        test, bank = ds.split(split), ds.split(bank_split)
        if len(test) == 0 or len(bank) == 0:
            raise RsitrError(f"{path}: split '{split}' or '{bank_split}' is empty (splits present: {ds.splits})")
        enc = encode_dataset(model.backbone, test, batch_size=batch_size, progress=progress, engine=engine)
        if bank_images:
            b = encode_dataset(model.backbone, bank, batch_size=batch_size, progress=progress, engine=engine)
            texts, images = b.texts, b.images
        else:
            texts, images = encode_texts(model.backbone, bank.texts()[0], engine, batch_size=batch_size, progress=progress), None
        log.info("%s: %d test images, bank %d captions%s", label, len(test), texts.shape[0], f", {images.shape[0]} images" if images is not None else "")
        out.append(EncodedSet(label, enc, texts, images))
    return out


def bank_metrics(test, texts: torch.Tensor | None, images: torch.Tensor | None, beta: float) -> dict[str, float]:
    """The protocol's metrics of an encoded test split with QB-Norm over a bank: images normalised
    by the bank ``texts`` (text->image), captions by the bank ``images`` (image->text); a side
    without a bank keeps the plain cosine. Also ``t2i_mR`` / ``i2t_mR``."""
    from rsitr.eval.evaluate import pair_metrics, qbnorm_pair

    if texts is None and images is None:
        m = pair_metrics(test.images @ test.texts.t(), test.text_to_image)
    else:
        m = pair_metrics(qbnorm_pair(test, texts, images, beta), test.text_to_image)
    for key, parts in DIRECTIONS.items():
        m[key] = sum(m[p] for p in parts) / len(parts)
    return m


def run(sets: list[EncodedSet], *, sizes: Sequence[int], draws: int = 3, seed: int = 0, beta: float = 14.0) -> dict[str, Any]:
    """The bench's rows over encoded sets (see the module doc)."""
    texts = torch.cat([s.bank_texts for s in sets])
    images = torch.cat([s.bank_images for s in sets]) if all(s.bank_images is not None for s in sets) else None
    dim = int(texts.shape[1])
    rows: list[dict[str, Any]] = []

    def add(bank: str, size: int | None, per_draw: list[dict[str, dict[str, float]]], with_images: bool) -> None:
        row: dict[str, Any] = {"bank": bank, "captions": size, "bank_images": with_images, "draws": len(per_draw),
                               "bytes_fp16": size * dim * 2 if size else 0}
        for s in sets:
            for key in DIRECTIONS:
                vals = np.array([d[s.label][key] for d in per_draw])
                row[f"{s.label}:{key}"] = float(vals.mean())
                if len(vals) > 1:
                    row[f"{s.label}:{key}_std"] = float(vals.std())
        rows.append(row)

    add("none", None, [{s.label: bank_metrics(s.test, None, None, beta) for s in sets}], False)
    if images is not None:
        add("own split, captions+images", None, [{s.label: bank_metrics(s.test, s.bank_texts, s.bank_images, beta) for s in sets}], True)
        add("full, captions+images", int(texts.shape[0]), [{s.label: bank_metrics(s.test, texts, images, beta) for s in sets}], True)
    add("full, captions", int(texts.shape[0]), [{s.label: bank_metrics(s.test, texts, None, beta) for s in sets}], False)
    for size in sorted({int(n) for n in sizes if 0 < int(n) < texts.shape[0]}, reverse=True):
        per = []
        for d in range(max(1, draws)):
            sub = texts[torch.from_numpy(subsample(texts.shape[0], size, seed + d))]
            per.append({s.label: bank_metrics(s.test, sub, None, beta) for s in sets})
        add(f"{size} captions", size, per, False)
        log.info("bank of %d captions: %s", size, ", ".join(f"{s.label} mR {rows[-1][f'{s.label}:mR']:.2f}" for s in sets))
    return {"beta": beta, "seed": seed, "draws": draws, "dim": dim, "datasets": [s.label for s in sets],
            "bank_captions": int(texts.shape[0]), "bank_images": None if images is None else int(images.shape[0]), "rows": rows}


def choose_size(res: dict[str, Any], tolerance: float = 0.1) -> dict[str, Any]:
    """The smallest caption bank whose mean mR is within ``tolerance`` of the full caption bank on
    every dataset (``size``), and whether it pays (``pays``: more than ``tolerance`` above no bank on
    some dataset)."""
    rows = {r["bank"]: r for r in res["rows"]}
    full, none = rows["full, captions"], rows["none"]
    labels = res["datasets"]
    ok = [r for r in res["rows"] if r["bank"].endswith(" captions") and r["bank"] != "full, captions"
          and all(r[f"{lab}:mR"] >= full[f"{lab}:mR"] - tolerance for lab in labels)]
    best = min(ok, key=lambda r: r["captions"]) if ok else full
    gain = {lab: best[f"{lab}:mR"] - none[f"{lab}:mR"] for lab in labels}
    return {"size": best["captions"], "bytes_fp16": best["bytes_fp16"], "tolerance": tolerance, "gain_over_none": gain,
            "pays": any(g > tolerance for g in gain.values()), "row": best["bank"]}


def markdown(res: dict[str, Any]) -> str:
    """The rows as a markdown table: mR (and its direction split) per dataset; ``±`` the spread over draws."""
    labels = res["datasets"]
    cols = ["bank", "captions", "MB fp16"] + [f"{lab} {k}" for lab in labels for k in DIRECTIONS]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        cells = [r["bank"], "" if r["captions"] is None else str(r["captions"]), f"{r['bytes_fp16'] / 1e6:.1f}"]
        for lab in labels:
            for k in DIRECTIONS:
                std = r.get(f"{lab}:{k}_std")
                cells.append(f"{r[f'{lab}:{k}']:.2f}" + (f" ±{std:.2f}" if std is not None else ""))
        out.append("| " + " | ".join(cells) + " |")
    if "choice" in res:
        c = res["choice"]
        out += ["", f"smallest caption bank within {c['tolerance']} mR of the full caption bank on every dataset: {c['row']} "
                    f"({c['bytes_fp16'] / 1e6:.1f} MB fp16); gain over no bank: "
                    + ", ".join(f"{k} {v:+.2f}" for k, v in c["gain_over_none"].items()) + ("" if c["pays"] else " (does not pay)")]
    return "\n".join(out)


def bench_qbank(checkpoint: str, data: Sequence[str], *, sizes: Sequence[int], draws: int = 3, seed: int = 0, beta: float = 14.0,
                split: str = "test", bank_split: str = "train", bank_images: bool = True, tolerance: float = 0.1,
                engine: str = "auto", batch_size: int = 128, progress: bool = True) -> dict[str, Any]:
    """Load ``checkpoint``, encode the ``data`` sets once, measure every bank (:func:`run`) and
    choose the size (:func:`choose_size`)."""
    from rsitr.methods.factory import load
    from rsitr.models.engine import engine_for

    if not beta > 0 or draws < 1:
        raise RsitrError(f"--beta must be > 0 and --draws >= 1 (got {beta}, {draws})")
    model = load(checkpoint)
    model.eval()
    sets = encode_sets(model, parse_data(data), split=split, bank_split=bank_split, bank_images=bank_images,
                       engine=engine_for(model.backbone, engine), batch_size=batch_size, progress=progress)
    res = run(sets, sizes=sizes, draws=draws, seed=seed, beta=beta)
    res["checkpoint"] = str(checkpoint)
    res["split"], res["bank_split"] = split, bank_split
    res["choice"] = choose_size(res, tolerance)
    return res


__all__ = ["bank_metrics", "bench_qbank", "choose_size", "encode_sets", "markdown", "parse_data", "run", "subsample"]
