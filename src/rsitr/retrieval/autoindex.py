"""Choosing and tuning a vector index for an archive, and measuring its recall.

* :func:`exact_neighbours` / :func:`recall_at_k`: the reference every approximate search is
  measured against (exact inner-product top-k by FAISS flat, computed once per query set), and
  ``|approx top-k ∩ exact top-k| / k`` averaged over the queries.
* :func:`auto_index`: the index ``--index-kind auto`` builds. Below ``flat_below`` vectors (50k by
  default) exact search is fast enough and is used; above, HNSW (no training pass, so a build of
  a million vectors stays minutes on a CPU), its ``efSearch`` raised through
  :data:`EF_SEARCH_STEPS` until recall@k on a sample of the index's own vectors reaches the target.
  The queries are *jittered copies* of sampled vectors: each moved by a random direction of the
  length of its distance to its nearest other vector, so a query sits among the vectors as a new
  item of the archive would, not on top of a stored one. When no step reaches the target the
  index is exact (flat, recall 1) and the record says why. The record (kind, parameters,
  measured recall, queries) goes into the index manifest.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from rsitr.retrieval.index import VectorIndex, load_faiss
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

TARGET_RECALL = 0.95
FLAT_BELOW = 50_000
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
HNSW_M = 32


def check_target(target: float) -> float:
    """A recall target must lie in (0, 1]; anything else is refused in one line."""
    t = float(target)
    if not 0.0 < t <= 1.0 or t != t:
        raise RsitrError(f"--target-recall must be in (0, 1] (a fraction of the exact top 10 found), got {target}")
    return t


def exact_neighbours(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Ids ``[len(xq), k]`` of the exact top-``k`` inner products of each query over ``xb``."""
    faiss = load_faiss()
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(np.ascontiguousarray(xb, dtype=np.float32))
    _, ids = flat.search(np.ascontiguousarray(xq, dtype=np.float32), min(k, len(xb)))
    return ids


def recall_at_k(ids: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of ``|ids[i, :k] ∩ exact[i, :k]| / k`` (missing hits, id -1, count as misses)."""
    k = min(k, exact.shape[1])
    if len(exact) == 0 or k == 0:
        return float("nan")
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist()) - {-1}) / k for a, b in zip(ids, exact)]))


def jittered_queries(xb: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit queries: sampled rows of ``xb`` each moved by a random direction as long as its
    distance to its nearest other row (module doc)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(xb), size=min(n, len(xb)), replace=False)
    base = xb[rows].astype(np.float32)
    nn = exact_neighbours(xb, base, 2)
    other = np.where(nn[:, 0] == rows, nn[:, 1], nn[:, 0])
    dist = np.linalg.norm(xb[other] - base, axis=1, keepdims=True)
    step = rng.standard_normal(base.shape).astype(np.float32)
    step *= dist / np.maximum(np.linalg.norm(step, axis=1, keepdims=True), 1e-12)
    q = base + step
    return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def auto_index(emb: np.ndarray, target: float = TARGET_RECALL, *, k: int = 10, flat_below: int = FLAT_BELOW, n_queries: int = 500,
               seed: int = 0) -> tuple[VectorIndex, dict[str, Any]]:
    """The index ``--index-kind auto`` picks for the unit rows ``emb`` and its record:
    ``{"kind", "params", "recall@k", "queries", "target_recall", "seconds"}`` (module doc)."""
    target = check_target(target)
    t0 = time.perf_counter()
    n, dim = emb.shape
    if n < max(1, flat_below):
        vi = VectorIndex(dim, "flat", normalize=False)
        if n:
            vi.add(emb)
        return vi, {"kind": "flat", "params": {}, f"recall@{k}": 1.0, "queries": 0, "target_recall": target,
                    "why": f"{n} vectors < {flat_below}: exact search", "seconds": round(time.perf_counter() - t0, 2)}
    xq = jittered_queries(emb, n_queries, seed)
    exact = exact_neighbours(emb, xq, k)
    vi = VectorIndex(dim, "hnsw", hnsw_m=HNSW_M, ef_search=EF_SEARCH_STEPS[0], normalize=False)
    vi.add(emb)
    rec = float("nan")
    for ef in EF_SEARCH_STEPS:
        set_ef_search(vi, ef)
        rec = recall_at_k(vi.search(xq, k)[1], exact, k)
        log.debug("auto index: hnsw efSearch=%d recall@%d %.4f", ef, k, rec)
        if rec >= target:
            return vi, {"kind": "hnsw", "params": {"M": HNSW_M, "efSearch": ef}, f"recall@{k}": round(rec, 4), "queries": len(xq),
                        "target_recall": target, "why": f"{n} vectors >= {flat_below}: HNSW tuned to the target",
                        "seconds": round(time.perf_counter() - t0, 2)}
    log.warning("auto index: HNSW reaches recall@%d %.4f at most (efSearch %d) < target %.2f; using exact search",
                k, rec, EF_SEARCH_STEPS[-1], target)
    vi = VectorIndex(dim, "flat", normalize=False)
    vi.add(emb)
    return vi, {"kind": "flat", "params": {}, f"recall@{k}": 1.0, "queries": len(xq), "target_recall": target,
                "why": f"HNSW reached recall@{k} {rec:.4f} at most (efSearch {EF_SEARCH_STEPS[-1]}) < {target}: exact search",
                "seconds": round(time.perf_counter() - t0, 2)}


def set_ef_search(vi: VectorIndex, ef: int) -> None:
    """Set an HNSW index's ``efSearch`` (recorded in its saved parameters)."""
    vi.ef_search = int(ef)
    vi.faiss_index.hnsw.efSearch = int(ef)


__all__ = ["EF_SEARCH_STEPS", "FLAT_BELOW", "TARGET_RECALL", "auto_index", "check_target", "exact_neighbours", "jittered_queries",
           "recall_at_k", "set_ef_search"]
