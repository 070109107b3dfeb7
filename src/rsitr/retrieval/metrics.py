"""The field's retrieval metrics: R@1/5/10 in both directions and their mean (mR).

Protocol (RSICD / RSITMD / UCM / Sydney / NWPU, test images x their captions):

* ``sim`` is the ``(n_images, n_texts)`` score matrix, higher = more similar;
  ``text_to_image[j]`` is the index of the image caption ``j`` describes. Every image must
  have at least one caption (usually five).
* Image -> text: an image is a hit at K when *any* of its captions is among the K best-scored
  texts, i.e. its rank is the rank of its best-ranked ground-truth caption.
* Text -> image: a caption is a hit at K when its one image is among the K best-scored images.
* R@K is the percentage of hits; mR is the mean of the six recalls (I2T and T2I at 1, 5, 10).

Ties. Exact ties are *not* rare: UCM-Captions and RSICD repeat the same caption string under
many images, and identical strings get identical embeddings, so for an image query its own
caption ties with the copies under other images. The field's evaluation code sorts the scores
(``np.argsort``) and so breaks such ties in an arbitrary order. ``retrieval_metrics(...,
ties=...)`` makes the choice explicit:

* ``"expected"`` (default): the expected recall when ties are broken uniformly at random - a
  query whose ``m`` ground truths tie with ``t`` wrong candidates, ``g`` wrong candidates scoring
  strictly higher, is a hit at K with probability ``1 - C(n - r, m) / C(n, m)``, ``n = m + t``,
  ``r = K - g`` (clamped to [0, 1]); this is what sort-based code gives on average;
* ``"optimistic"``: ties never count against the ground truth (rank = number strictly higher);
* ``"pessimistic"``: every tied wrong candidate is ranked first.

Without ties the three agree. ``ranks_i2t`` / ``ranks_t2i`` return the optimistic ranks (the
number of wrong candidates scoring strictly higher); ``tie_counts`` gives the rest.

Memory: the matrix is read in blocks of image rows (one pass for both directions), by default
``min(1024, 2**23 // n_texts)`` rows, so the temporaries (a boolean and an int32 block of that
size, plus vectors) stay around 40 MB whatever the split: a 5,000 x 25,000 float32 split needs
the matrix itself plus that.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

KS = (1, 5, 10)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
DEFAULT_CHUNK = 1024  # most image rows per block
CHUNK_ELEMENTS = 1 << 23  # and at most this many scores per block (automatic chunking)

ArrayLike = Any  # np.ndarray | torch.Tensor (| nested lists, converted)


def _as_sim(sim: ArrayLike) -> torch.Tensor:
    if isinstance(sim, torch.Tensor):
        t = sim.detach()
    else:
        arr = np.asarray(sim)
        if any(s < 0 for s in arr.strides):
            arr = np.ascontiguousarray(arr)
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"sim must hold real scores, got dtype {arr.dtype}")
        with warnings.catch_warnings():  # read-only arrays: we never write to it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"sim must hold real scores, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"sim must be a 2-D (n_images, n_texts) matrix, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"sim is empty: shape {tuple(t.shape)}")
    return t


def _as_owner(text_to_image: ArrayLike, n_images: int, n_texts: int, device: torch.device) -> torch.Tensor:
    if isinstance(text_to_image, torch.Tensor):
        arr = text_to_image.detach().cpu().numpy()
    else:
        arr = np.asarray(text_to_image)
    if arr.ndim != 1:
        raise ValueError(f"text_to_image must be a 1-D sequence of image indices, got shape {arr.shape}")
    if arr.shape[0] != n_texts:
        raise ValueError(
            f"shape mismatch: sim has {n_texts} texts (columns) but text_to_image has {arr.shape[0]} entries"
        )
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("text_to_image must hold integer image indices, found non-integer values")
    owner = arr.astype(np.int64)
    bad = np.flatnonzero((owner < 0) | (owner >= n_images))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"text_to_image out of range: text {j} points to image {int(owner[j])}, but sim has "
            f"{n_images} images (valid 0..{n_images - 1}); {bad.size} such text(s)"
        )
    counts = np.bincount(owner, minlength=n_images)
    orphans = np.flatnonzero(counts == 0)
    if orphans.size:
        shown = ", ".join(str(int(i)) for i in orphans[:10]) + (", ..." if orphans.size > 10 else "")
        raise ValueError(
            f"{orphans.size} image(s) have no text in text_to_image (image indices {shown}); "
            "every image needs at least one caption for image->text recall"
        )
    return torch.from_numpy(owner).to(device)


def _widen(t: torch.Tensor) -> torch.Tensor:
    """Compare in float32/float64: exact for half precision (whose CPU kernels are slow) and ints."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    if not t.is_floating_point():
        return t.double()
    return t


def _block(sim: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    blk = _widen(sim[start:stop])
    if torch.isnan(blk).any():
        raise ValueError(f"sim contains NaN (rows {start}..{stop - 1})")
    return blk


def _ranks(
    sim: ArrayLike, text_to_image: ArrayLike, chunk_size: int | None, want_i2t: bool, want_t2i: bool, ties: bool = False
):
    s = _as_sim(sim)
    n_images, n_texts = s.shape
    if chunk_size is None:
        chunk_size = min(DEFAULT_CHUNK, max(1, CHUNK_ELEMENTS // n_texts))
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk_size = int(chunk_size)
    owner = _as_owner(text_to_image, n_images, n_texts, s.device)
    cols = torch.arange(n_texts, device=s.device)
    # score of every caption with its own image, and each image's best ground-truth score
    pos = _widen(s[owner, cols])
    best_gt = None
    if want_i2t:
        best_gt = torch.full((n_images,), float("-inf"), dtype=pos.dtype, device=s.device)
        best_gt = best_gt.scatter_reduce(0, owner, pos, reduce="amax", include_self=True)
    r_i2t = torch.empty(n_images, dtype=torch.int64, device=s.device) if want_i2t else None
    r_t2i = torch.zeros(n_texts, dtype=torch.int64, device=s.device) if want_t2i else None
    eq_i2t = torch.empty(n_images, dtype=torch.int64, device=s.device) if (want_i2t and ties) else None
    eq_t2i = torch.zeros(n_texts, dtype=torch.int64, device=s.device) if (want_t2i and ties) else None
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        blk = _block(s, start, stop)
        if want_i2t:
            r_i2t[start:stop] = (blk > best_gt[start:stop, None]).sum(dim=1, dtype=torch.int32)
            if ties:
                eq_i2t[start:stop] = (blk == best_gt[start:stop, None]).sum(dim=1, dtype=torch.int32)
        if want_t2i:
            r_t2i += (blk > pos[None, :]).sum(dim=0, dtype=torch.int32)
            if ties:
                eq_t2i += (blk == pos[None, :]).sum(dim=0, dtype=torch.int32)
    out = (
        r_i2t.cpu().numpy() if r_i2t is not None else None,
        r_t2i.cpu().numpy() if r_t2i is not None else None,
    )
    if not ties:
        return out
    # ground truths at the best score: i2t, the image's own captions equal to its best; t2i, one
    m_i2t = None
    if want_i2t:
        at_best = (pos == best_gt[owner]).to(torch.int64)
        m_i2t = torch.zeros(n_images, dtype=torch.int64, device=s.device).scatter_add_(0, owner, at_best)
    return out + (
        (eq_i2t - m_i2t).cpu().numpy() if want_i2t else None,
        m_i2t.cpu().numpy() if want_i2t else None,
        (eq_t2i - 1).cpu().numpy() if want_t2i else None,
    )


def ranks_i2t(sim: ArrayLike, text_to_image: ArrayLike, chunk_size: int | None = None) -> np.ndarray:
    """0-based rank of each image's best-ranked ground-truth caption among all texts.

    ``rank[i]`` = number of texts scoring strictly higher (for image ``i``) than the best of
    its own captions. Shape ``(n_images,)``, int64.
    """
    r, _ = _ranks(sim, text_to_image, chunk_size, True, False)
    return r


def ranks_t2i(sim: ArrayLike, text_to_image: ArrayLike, chunk_size: int | None = None) -> np.ndarray:
    """0-based rank of each caption's image among all images.

    ``rank[j]`` = number of images scoring strictly higher with text ``j`` than its own image.
    Shape ``(n_texts,)``, int64.
    """
    _, r = _ranks(sim, text_to_image, chunk_size, False, True)
    return r


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of 0-based ``ranks`` below ``k``."""
    ranks = np.asarray(ranks)
    return float(100.0 * np.count_nonzero(ranks < k) / ranks.size) if ranks.size else 0.0


TIES = ("expected", "optimistic", "pessimistic")


def hit_probability(greater: np.ndarray, tied: np.ndarray, gts: np.ndarray, k: int) -> np.ndarray:
    """P(hit at ``k``) when the ``gts`` ground truths and ``tied`` wrong candidates share one
    score (random order among them) and ``greater`` wrong candidates score higher:
    ``1 - C(n - r, m) / C(n, m)`` with ``n = m + t``, ``r = k - g``, clamped."""
    from math import lgamma

    g, t, m = (np.asarray(a, dtype=np.int64) for a in (greater, tied, gts))
    r = k - g
    out = np.where(r > t, 1.0, 0.0)
    mid = np.flatnonzero((r > 0) & (r <= t))
    for i in mid:  # only queries with ties near the cut-off: few
        n, mm, rr = int(m[i] + t[i]), int(m[i]), int(r[i])
        if n - rr < mm:
            out[i] = 1.0
        else:  # C(n-r, m) / C(n, m)
            log_ratio = (lgamma(n - rr + 1) - lgamma(n - rr - mm + 1)) - (lgamma(n + 1) - lgamma(n - mm + 1))
            out[i] = 1.0 - float(np.exp(log_ratio))
    return out


def tie_counts(sim: ArrayLike, text_to_image: ArrayLike, chunk_size: int | None = None) -> dict[str, np.ndarray]:
    """Per query: wrong candidates scoring strictly higher (``*_greater``), wrong candidates tied
    with the best ground truth (``*_tied``) and ground truths at that score (``i2t_gts``)."""
    r_i2t, r_t2i, t_i2t, m_i2t, t_t2i = _ranks(sim, text_to_image, chunk_size, True, True, ties=True)
    return {"i2t_greater": r_i2t, "i2t_tied": t_i2t, "i2t_gts": m_i2t, "t2i_greater": r_t2i, "t2i_tied": t_t2i}


def retrieval_metrics(sim: ArrayLike, text_to_image: ArrayLike, chunk_size: int | None = None, ties: str = "expected") -> dict[str, float]:
    """The field's protocol on a ``(n_images, n_texts)`` score matrix (numpy or torch).

    Returns percentages ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10`` and ``mR`` (their
    mean) as Python floats. Raises ``ValueError`` on a shape mismatch, an out-of-range image
    index, an image without captions or NaN scores. See the module docstring for ties.
    ``chunk_size`` is the number of image rows compared at once (default: automatic, see the
    module docstring); the result does not depend on it.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    out: dict[str, float] = {}
    if ties == "optimistic":
        r_i2t, r_t2i = _ranks(sim, text_to_image, chunk_size, True, True)
        for k in KS:
            out[f"i2t_r{k}"] = recall_at(r_i2t, k)
        for k in KS:
            out[f"t2i_r{k}"] = recall_at(r_t2i, k)
    else:
        c = tie_counts(sim, text_to_image, chunk_size)
        ones = np.ones_like(c["t2i_greater"])
        for d, m in (("i2t", c["i2t_gts"]), ("t2i", ones)):
            g, t = c[f"{d}_greater"], c[f"{d}_tied"]
            for k in KS:
                hits = hit_probability(g, t, m, k) if ties == "expected" else (g + t < k).astype(np.float64)
                out[f"{d}_r{k}"] = float(100.0 * hits.mean())
    out["mR"] = float(sum(out[key] for key in METRIC_KEYS[:6]) / 6.0)
    return out


_HEADER = "| model | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR |"
_ALIGN = "|---|---:|---:|---:|---:|---:|---:|---:|"


def _rows(metrics: Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]], name: str) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(metrics, Mapping):
        if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
            return [(str(k), v) for k, v in metrics.items()]  # {model name: metrics}
        return [(name, metrics)]
    rows = []
    for item in metrics:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[1], Mapping)):
            raise ValueError(f"format_table expects a metrics dict or (name, metrics dict) pairs, got {item!r}")
        rows.append((str(item[0]), item[1]))
    return rows


def format_table(
    metrics: Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]],
    title: str | None = None,
    name: str = "model",
    digits: int = 2,
) -> str:
    """Markdown table of one or several results.

    ``metrics`` is one metrics dict (its row is labelled ``name``), a list of ``(name, dict)``
    pairs, or a ``{name: dict}`` mapping. Columns:
    ``| model | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR |``, values with ``digits``
    decimals, ``-`` for a missing value. ``title``, if given, is printed above the table.
    """
    lines = []
    if title:
        lines += [str(title), ""]
    lines += [_HEADER, _ALIGN]
    for label, m in _rows(metrics, name):
        cells = [label.replace("|", "\\|")]
        for key in METRIC_KEYS:
            v = m.get(key)
            cells.append("-" if v is None else f"{float(v):.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_CHUNK",
    "KS",
    "METRIC_KEYS",
    "format_table",
    "ranks_i2t",
    "ranks_t2i",
    "recall_at",
    "retrieval_metrics",
]
