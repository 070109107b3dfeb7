"""Choosing and tuning a vector index for an archive, and measuring its recall.

* :func:`exact_neighbours` / :func:`recall_at_k`: the reference every approximate search is
  measured against (exact inner-product top-k by FAISS flat, computed once per query set), and
  ``|approx top-k ∩ exact top-k| / k`` averaged over the queries.
* :func:`auto_index`: the index ``--index-kind auto`` builds. Below ``flat_below`` vectors (50k by
  default) exact search is fast enough and is used. Above, it builds the candidates of
  :data:`CANDIDATES` in turn - IVF-Flat (``nlist`` = 4 sqrt(n), :func:`rsitr.retrieval.index.ivf_nlist`;
  k-means on a sample of :data:`IVF_TRAIN_PER_CELL` vectors per cell; ``nprobe`` raised through
  :data:`NPROBE_STEPS` up to ``nlist / 8``), then HNSW with M 32 and M 48 (``efConstruction`` 80 and
  120; ``efSearch`` raised through :data:`EF_SEARCH_STEPS`; the larger graph only when the smaller
  one missed the target) - tunes each to the target recall@k on a sample of the index's own
  vectors (the lower one-sided 95 % bound of the recall must reach it, :data:`RECALL_Z`), times
  the tuned candidate one query at a time (as a search does) and keeps the one with the lowest
  median query time among those that reach the target. Exact search (flat, recall 1) is the
  fallback only when none does.

  The queries are *jittered copies* of sampled vectors: each moved by a random direction of the
  length of its distance to its nearest other vector, so a query sits among the vectors as a new
  item of the archive would, not on top of a stored one.

  Why IVF is a candidate: on clustered archives (many tight groups whose centres point in
  unrelated directions, as ``rsitr bench search --data clustered`` generates: n/100 groups of
  about 100) a graph search has to route between groups that share almost no geometry, and then
  nearly exhaust the query's group, because its exact top 10 are near-ties there (at 300k vectors
  the cosines of ranks 10 and 11 differ by 0.0005 on average; rank 100 is 0.56). That is where
  HNSW M 32 (efConstruction 40) stalled at recall@10 0.928 with efSearch 512 on a million vectors.
  IVF compares every query with every cell centre exactly and scans whole cells, which keep a
  group together; a larger HNSW graph routes better but costs far more to build.

  Cost, measured at a million 256-d clustered vectors on this machine's 2 shared cores (load
  average 10, one FAISS thread): the whole auto build took 238 s - the IVF candidate 164 s
  (k-means of 4000 cells on 256k vectors 112 s, filling 53 s), then HNSW M 32 (projected 854 s)
  and M 48 (projected 1090 s) were abandoned within 34 s and 22 s by the budget. The build budget
  ``budget_s`` (default 900 s) bounds it: candidates are tried cheapest first, none is started
  once the budget is spent, and one whose build (filled in chunks) is projected from its rate so
  far to end past the budget is abandoned; the record says which were skipped and why. So a
  build takes about the budget at most, plus the last candidate's tuning and the final fill of an
  exact fallback. Each long build shows a progress bar (a log line per tenth without a terminal).

  The record (kind, parameters, measured recall and query time, every candidate tried with its
  recall and time, or why it was skipped) goes into the index manifest.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from rsitr.retrieval.index import IVF_TRAIN_PER_CELL, VectorIndex, ivf_nlist, load_faiss
from rsitr.utils.errors import RsitrError
from rsitr.utils.progress import progress_bar

log = logging.getLogger(__name__)

TARGET_RECALL = 0.95
FLAT_BELOW = 50_000
EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# a candidate reaches the target when the lower one-sided 95 % bound of its recall over the
# tuning queries does (not the mean alone): the recall an index reaches on the queries it was tuned
# on overstates what it does on others by about the sampling error, so a mean just at the target
# was below it on fresh queries about half the time
RECALL_Z = 1.645
NPROBE_MAX_SHARE = 8  # nprobe stops at nlist / 8: scanning more than an eighth of the archive is no longer worth it
# (kind, build parameters), cheapest build first; HNSW: M and efConstruction
CANDIDATES: tuple[tuple[str, dict[str, int]], ...] = (("ivf", {}), ("hnsw", {"M": 32, "efConstruction": 80}),
                                                      ("hnsw", {"M": 48, "efConstruction": 120}))
BUDGET_S = 900.0
TIMED_QUERIES = 200
ADD_CHUNK = 20_000


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


def per_query_recall(ids: np.ndarray, exact: np.ndarray, k: int) -> np.ndarray:
    """``|ids[i, :k] ∩ exact[i, :k]| / k`` for each query (missing hits, id -1, count as misses)."""
    k = min(k, exact.shape[1])
    if k == 0:
        return np.zeros(0)
    return np.array([len(set(a[:k].tolist()) & set(b[:k].tolist()) - {-1}) / k for a, b in zip(ids, exact)], dtype=np.float64)


def recall_at_k(ids: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of ``|ids[i, :k] ∩ exact[i, :k]| / k`` (missing hits, id -1, count as misses)."""
    per = per_query_recall(ids, exact, k)
    return float(per.mean()) if len(per) else float("nan")


def recall_lower_bound(per: np.ndarray, z: float | None = None) -> float:
    """One-sided lower confidence bound of the mean of per-query recalls: ``mean - z * sd /
    sqrt(n)`` (normal approximation; ``z`` :data:`RECALL_Z`, 95 %)."""
    z = RECALL_Z if z is None else z
    if len(per) < 2:
        return float(per.mean()) if len(per) else float("nan")
    return float(per.mean() - z * per.std(ddof=1) / np.sqrt(len(per)))


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


class _OverBudget(Exception):
    """A candidate's build would end after the budget (its projected total seconds)."""


def _add_in_chunks(vi: VectorIndex, emb: np.ndarray, desc: str, progress: bool, deadline: float | None) -> None:
    """``vi.add`` in chunks of :data:`ADD_CHUNK` with a progress bar; raises :class:`_OverBudget`
    as soon as the rate so far projects the end past ``deadline`` (a ``perf_counter`` time)."""
    t0 = time.perf_counter()
    with progress_bar(total=len(emb), desc=desc, disable=not progress, unit="vec") as bar:
        for i in range(0, len(emb), ADD_CHUNK):
            vi.add(emb[i : i + ADD_CHUNK])
            done = min(i + ADD_CHUNK, len(emb))
            bar.update(done - i)
            now = time.perf_counter()
            if deadline is not None and done < len(emb) and now + (now - t0) / done * (len(emb) - done) > deadline:
                raise _OverBudget(round((now - t0) / done * len(emb), 1))


def _build(kind: str, params: dict[str, int], emb: np.ndarray, seed: int, progress: bool,
           deadline: float | None) -> tuple[VectorIndex, dict[str, int]]:
    """One candidate over ``emb`` (its build parameters, ``nlist`` for IVF)."""
    n, dim = emb.shape
    if kind == "ivf":
        nlist = ivf_nlist(n)
        vi = VectorIndex(dim, "ivf", nlist=nlist, nprobe=1, normalize=False)
        rows = np.random.default_rng(seed).choice(n, size=min(n, IVF_TRAIN_PER_CELL * nlist), replace=False)
        t0 = time.perf_counter()
        vi.train(emb[np.sort(rows)])
        log.info("auto index: IVF k-means of %d cells on %d vectors in %.1f s", nlist, len(rows), time.perf_counter() - t0)
        _add_in_chunks(vi, emb, f"auto index: IVF nlist={nlist}", progress, deadline)
        return vi, {"nlist": nlist}
    vi = VectorIndex(dim, "hnsw", hnsw_m=params["M"], ef_construction=params["efConstruction"], ef_search=EF_SEARCH_STEPS[0], normalize=False)
    _add_in_chunks(vi, emb, f"auto index: HNSW M={params['M']} efConstruction={params['efConstruction']}", progress, deadline)
    return vi, dict(params)


def set_nprobe(vi: VectorIndex, nprobe: int) -> None:
    """Set an IVF index's ``nprobe`` (recorded in its saved parameters)."""
    vi.nprobe = int(nprobe)
    load_faiss().extract_index_ivf(vi.faiss_index).nprobe = int(nprobe)


def _search_steps(vi: VectorIndex) -> tuple[str, tuple[int, ...], Callable[[VectorIndex, int], None]]:
    """The query-time knob of ``vi``: its name, the values tried (ascending) and its setter."""
    if vi.kind == "ivf":
        bound = max(1, vi.nlist // NPROBE_MAX_SHARE)
        return "nprobe", tuple(sorted({p for p in NPROBE_STEPS if p < bound} | {bound})), set_nprobe
    return "efSearch", EF_SEARCH_STEPS, set_ef_search


def _tune(vi: VectorIndex, xq: np.ndarray, exact: np.ndarray, k: int, target: float) -> tuple[str, int, float, bool]:
    """Raise ``vi``'s query-time knob until recall@k over ``xq`` reaches ``target`` with its lower
    95 % bound (:data:`RECALL_Z`); returns ``(knob, value, recall, lower bound, reached)`` (the last
    value tried when it never does)."""
    name, steps, setter = _search_steps(vi)
    rec = low = float("nan")
    for v in steps:
        setter(vi, v)
        per = per_query_recall(vi.search(xq, k)[1], exact, k)
        rec, low = float(per.mean()), recall_lower_bound(per)
        log.debug("auto index: %s %s=%d recall@%d %.4f (lower bound %.4f)", vi.kind, name, v, k, rec, low)
        if low >= target:
            return name, v, rec, low, True
    return name, steps[-1], rec, low, False


def query_ms(vi: VectorIndex, xq: np.ndarray, k: int) -> tuple[float, float]:
    """Median and 95th percentile (ms) of ``vi.search`` on the rows of ``xq`` one at a time."""
    vi.search(xq[:1], k)  # warm-up
    lat = []
    for i in range(len(xq)):
        t = time.perf_counter()
        vi.search(xq[i : i + 1], k)
        lat.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 95))


def auto_index(emb: np.ndarray, target: float = TARGET_RECALL, *, k: int = 10, flat_below: int = FLAT_BELOW, n_queries: int = 500,
               seed: int = 0, budget_s: float | None = BUDGET_S, candidates: tuple[tuple[str, dict[str, int]], ...] = CANDIDATES,
               progress: bool = True) -> tuple[VectorIndex, dict[str, Any]]:
    """The index ``--index-kind auto`` picks for the unit rows ``emb`` and its record:
    ``{"kind", "params", "recall@k", "query_ms": {"p50", "p95"}, "queries", "target_recall", "why",
    "seconds", "candidates": [{"kind", "params", "recall@k", "reached", "query_ms", "build_s"} or
    {"kind", "params", "skipped"}]}`` (module doc). ``budget_s``: the build budget in seconds, no
    candidate is started or continued past it (None: no limit; module doc); ``candidates``:
    ``(kind, build parameters)`` in the order they are tried."""
    target = check_target(target)
    t0 = time.perf_counter()
    n, dim = emb.shape
    if n < max(1, flat_below):
        vi = VectorIndex(dim, "flat", normalize=False)
        if n:
            vi.add(emb)
        return vi, {"kind": "flat", "params": {}, f"recall@{k}": 1.0, "queries": 0, "target_recall": target,
                    "why": f"{n} vectors < {flat_below}: exact search", "seconds": round(time.perf_counter() - t0, 2), "candidates": []}
    xq = jittered_queries(emb, n_queries, seed)
    exact = exact_neighbours(emb, xq, k)
    tried: list[dict[str, Any]] = []
    best: tuple[VectorIndex, dict[str, Any]] | None = None
    hnsw_reached = False
    for kind, params in candidates:
        spent = time.perf_counter() - t0
        if budget_s is not None and spent > budget_s:
            tried.append({"kind": kind, "params": dict(params), "skipped": f"build budget {budget_s:.0f} s spent ({spent:.0f} s)"})
            log.info("auto index: %s %s skipped: build budget %.0f s spent", kind, params, budget_s)
            continue
        if kind == "hnsw" and hnsw_reached:
            tried.append({"kind": kind, "params": dict(params), "skipped": "a smaller HNSW graph reached the target"})
            continue
        tb = time.perf_counter()
        try:
            vi, built = _build(kind, params, emb, seed, progress, None if budget_s is None else t0 + budget_s)
        except _OverBudget as over:
            tried.append({"kind": kind, "params": dict(params), "skipped": f"abandoned after {time.perf_counter() - tb:.0f} s: at its rate "
                          f"so far its build would take {over.args[0]:.0f} s and end {tb - t0 + over.args[0]:.0f} s into auto's build, "
                          f"past the build budget {budget_s:.0f} s"})
            log.info("auto index: %s %s %s", kind, params, tried[-1]["skipped"])
            continue
        knob, value, rec, low, reached = _tune(vi, xq, exact, k, target)
        p50, p95 = query_ms(vi, xq[:TIMED_QUERIES], k)
        entry = {"kind": kind, "params": {**built, knob: value}, f"recall@{k}": round(rec, 4), "recall_lower95": round(low, 4), "reached": reached,
                 "query_ms": {"p50": round(p50, 3), "p95": round(p95, 3)}, "build_s": round(time.perf_counter() - tb, 1)}
        tried.append(entry)
        log.info("auto index: %s %s recall@%d %.4f (%s target %.2f), query p50 %.3f ms p95 %.3f ms, %.0f s", kind, entry["params"], k, rec,
                 "reaches" if reached else "misses", target, p50, p95, entry["build_s"])
        hnsw_reached |= reached and kind == "hnsw"
        if reached and (best is None or p50 < best[1]["query_ms"]["p50"]):
            best = (vi, entry)
        del vi
    common = {"queries": len(xq), "target_recall": target, "candidates": tried}
    if best is not None:
        vi, entry = best
        why = (f"{n} vectors >= {flat_below}: the fastest of {sum('reached' in c for c in tried)} candidates tuned to the target "
               f"({sum(bool(c.get('reached')) for c in tried)} reached it)")
        return vi, {"kind": entry["kind"], "params": entry["params"], f"recall@{k}": entry[f"recall@{k}"],
                    "recall_lower95": entry["recall_lower95"], "query_ms": entry["query_ms"],
                    **common, "why": why, "seconds": round(time.perf_counter() - t0, 2)}
    most = max((c[f"recall@{k}"] for c in tried if "reached" in c), default=float("nan"))
    log.warning("auto index: no candidate reaches recall@%d %.2f (best %.4f); using exact search", k, target, most)
    vi = VectorIndex(dim, "flat", normalize=False)
    vi.add(emb)
    return vi, {"kind": "flat", "params": {}, f"recall@{k}": 1.0, **common,
                "why": f"no candidate reached recall@{k} {target} (best {most:.4f}): exact search",
                "seconds": round(time.perf_counter() - t0, 2)}


def set_ef_search(vi: VectorIndex, ef: int) -> None:
    """Set an HNSW index's ``efSearch`` (recorded in its saved parameters)."""
    vi.ef_search = int(ef)
    vi.faiss_index.hnsw.efSearch = int(ef)


__all__ = ["BUDGET_S", "CANDIDATES", "EF_SEARCH_STEPS", "FLAT_BELOW", "NPROBE_STEPS", "RECALL_Z", "TARGET_RECALL", "auto_index", "check_target",
           "exact_neighbours", "jittered_queries", "per_query_recall", "query_ms", "recall_at_k", "recall_lower_bound", "set_ef_search", "set_nprobe"]
