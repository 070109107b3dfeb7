"""``rsitr bench scale``: what it costs to go past one machine, measured here and projected.

Three parts, one run, printed as JSON (``--json``) or markdown tables:

1. **encode**: the same images (``--images``, default the UCM-Captions images at ``$RSITR_UCM`` or
   ``../shared/data/ucm-captions``; the first ``--limit`` files) indexed by
   the single-process build (:func:`rsitr.search.build.build_index`) and by the Ray build
   (:func:`rsitr.search.raybuild.build_index_ray`) with each of ``--workers`` encoder actors (one
   CPU/thread each) on one local Ray started once (its start-up is reported, not counted). Rows:
   wall seconds of the build (listing, decoding, encoding, writing, merging; Ray rows include
   starting the actors, which load the model), end-to-end tiles/s, tiles/s per core used, and the
   max abs difference of the Ray vectors from the single-process ones.
2. **search**: ``--sizes`` random unit vectors (``--dim``), ``--queries`` random queries, one
   query per call (as a user's search), in each vector store of ``--stores`` (default: every
   registered store with a benchmark whose optional dependency imports,
   :func:`rsitr.retrieval.stores.bench_store_kinds`; FAISS with 1 search thread, the others
   through their client, e.g. a local gRPC round trip) - build or insert seconds, p50/p95
   latency, recall@k against exact numpy search, bytes per vector on disk. Sizes above
   ``--flat-only-above`` (default 200k) measure the exact kind only.
3. **projection** (not measured): tiles/s per core from part 1 and latency per million vectors
   from part 2, extrapolated to 10M and 100M tiles: encode core-hours and wall hours on a
   cluster, GB on disk per million tiles, exact-search latency when the archive is split into S
   shards searched in parallel (latency ~ per-million cost x N/S + the per-request overhead
   measured for each store), HNSW latency taken as measured (grows ~log N).

The machine is whatever runs the command (often shared); the JSON records cpu count and load.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "towers:efficientnet-lite0+minilm-l6"
REFERENCE_STORE = "faiss"  # the store the projection fits HNSW and sizes on (always measured first when chosen)


# -- 1. encode -------------------------------------------------------------------------------------
def _subset(images: Path, limit: int | None, work: Path) -> Path:
    """A folder of symlinks to the first ``limit`` image files under ``images`` (sorted)."""
    from rsitr.search.sources import iter_image_files

    files = list(iter_image_files(images))
    if not files:
        raise RsitrError(f"{images}: no images found")
    files = files[: limit or len(files)]
    sub = work / "images"
    sub.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        (sub / f"{i:07d}{f.suffix.lower()}").symlink_to(f)
    return sub


def run_encode_bench(images: str | Path | None, checkpoint: str, limit: int | None, workers: Sequence[int], batch_size: int,
                     work: Path, engine: str = "auto", progress: bool = True) -> dict:
    from rsitr.search import build as B
    from rsitr.search import raybuild as R

    if images is None:
        from rsitr.bench.throughput import default_image_dir

        images = default_image_dir()
        if images is None:
            raise RsitrError("no images to encode: give --images DIR (the UCM-Captions images are looked for at $RSITR_UCM "
                             "or ../shared/data/ucm-captions)")
    src = _subset(Path(images), limit, work)
    threads = _threads()
    model = B.load_model(checkpoint)
    opts = B.BuildOptions(tile_size=256, batch_size=batch_size, progress=progress, engine=engine)
    rows = []
    t0 = time.perf_counter()
    r = B.build_index(src, checkpoint, work / "local", opts, model=model)
    wall = time.perf_counter() - t0
    ref = B.read_embeddings(work / "local", B.read_manifest(work / "local"))
    rows.append({"executor": "single process", "workers": 1, "cores": threads, "tiles": r.encoded, "seconds": round(wall, 1),
                 "tiles_per_s": round(r.encoded / wall, 2), "tiles_per_s_per_core": round(r.encoded / wall / threads, 2),
                 "max_abs_diff": 0.0, "note": f"{threads} torch/ONNX threads, model load excluded"})
    t1 = time.perf_counter()
    with R.ray_session(None, num_cpus=max(workers) + 1):
        ray_start = time.perf_counter() - t1
        for w in workers:
            out = work / f"ray-{w}"
            t0 = time.perf_counter()
            r = R.build_index_ray(src, checkpoint, out, opts, R.RayOptions(workers=w, shard_size=256), model=model)
            wall = time.perf_counter() - t0
            emb = B.read_embeddings(out, B.read_manifest(out))
            rows.append({"executor": "ray", "workers": w, "cores": min(w, os.cpu_count() or w), "tiles": r.encoded, "seconds": round(wall, 1),
                         "tiles_per_s": round(r.encoded / wall, 2),
                         "tiles_per_s_per_core": round(r.encoded / wall / min(w, os.cpu_count() or w), 2),
                         "max_abs_diff": float(np.abs(emb - ref).max()), "note": "1 thread per actor, actor start-up included"})
            shutil.rmtree(out, ignore_errors=True)
    return {"images": str(images), "n": int(r.encoded), "model": checkpoint, "batch_size": batch_size, "engine": engine,
            "ray_start_s": round(ray_start, 1), "rows": rows}


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


# -- 2. search -------------------------------------------------------------------------------------
def _unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _exact(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    best_s = np.full((len(xq), 0), -np.inf, np.float32)
    best_i = np.zeros((len(xq), 0), np.int64)
    for b0 in range(0, len(xb), 200_000):
        s = xq @ xb[b0 : b0 + 200_000].T
        i = np.broadcast_to(np.arange(b0, b0 + s.shape[1]), s.shape)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def _latency(fn, xq: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    fn(xq[:1], k)  # warm-up
    lat, ids = [], []
    for i in range(len(xq)):
        t0 = time.perf_counter()
        _, I = fn(xq[i : i + 1], k)
        lat.append((time.perf_counter() - t0) * 1e3)
        ids.append(np.pad(I[0], (0, k - len(I[0])), constant_values=-1))
    return lat, np.stack(ids)


def bench_stores(stores: Sequence[str] | None = None) -> list[str]:
    """The store kinds to measure: ``stores`` (each a registered store with a benchmark whose
    optional dependency imports, else an error naming what is missing) or, when None, every such
    store (:func:`rsitr.retrieval.stores.bench_store_kinds`)."""
    from rsitr.retrieval.stores import bench_store_kinds, store_class

    if stores is None:
        return list(bench_store_kinds())
    out = []
    for kind in stores:
        cls = store_class(kind)  # an unknown kind: an error naming the known ones
        if kind not in bench_store_kinds(available_only=False):
            raise RsitrError(f"--stores {kind}: this store has no benchmark (stores with one: {', '.join(bench_store_kinds(available_only=False))})")
        if not cls.available():
            raise RsitrError(f"--stores {kind}: its optional dependency is not installed (pip install 'rsitr[scale]')")
        if kind not in out:
            out.append(kind)
    if not out:
        raise RsitrError("--stores: name at least one store")
    return out


def run_search_bench(sizes: Sequence[int], dim: int, n_queries: int, k: int, work: Path, kinds: Sequence[str] = ("flat", "hnsw"),
                     stores: Sequence[str] | None = None, seed: int = 0, flat_only_above: int | None = None) -> list[dict]:
    """One row per size x store (``stores``: see :func:`bench_stores`) x index kind.
    ``flat_only_above``: sizes above it measure the exact kind only (building HNSW over a million
    vectors takes tens of minutes on a loaded 2-core machine)."""
    import faiss

    from rsitr.retrieval.stores import store_class

    classes = [store_class(kind) for kind in bench_stores(stores)]

    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        xb, xq = _unit(n, dim, rng), _unit(n_queries, dim, rng)
        truth = _exact(xb, xq, k)
        recs = [{"id": i, "path": f"/archive/{i:09d}.tif"} for i in range(n)]

        def row(store, kind, build_s, lat, ids, nbytes, params):
            rec = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, truth)]))
            r = {"n": n, "dim": dim, "store": store, "kind": kind, "params": params, "build_s": round(build_s, 1),
                 "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
                 f"recall@{k}": round(rec, 4), "bytes_per_vector": round(nbytes / n, 1)}
            log.info("scale bench: %s", r)
            rows.append(r)

        threads = faiss.omp_get_max_threads()
        size_kinds = [kd for kd in kinds if flat_only_above is None or n <= flat_only_above or kd == "flat"]
        for cls in classes:
            for kind in size_kinds:
                faiss.omp_set_num_threads(threads)  # builds use every thread, searches one (as a user's search)
                t0 = time.perf_counter()
                st = cls.bench_build(work, f"{cls.kind}-{kind}-{n}", dim, kind, xb, recs)
                try:
                    build = time.perf_counter() - t0
                    faiss.omp_set_num_threads(1)
                    lat, ids = _latency(st.search, xq, k)
                    params = st.bench_params()
                finally:
                    nbytes = st.bench_release()
                row(cls.bench_name, kind, build, lat, ids, nbytes, params)
                del st
            faiss.omp_set_num_threads(threads)
        del xb
    return rows


# -- 3. projection ---------------------------------------------------------------------------------
def projection(encode: dict | None, search: list[dict], dim: int, targets: Sequence[int] = (10_000_000, 100_000_000),
               shards: Sequence[int] = (1, 8, 64), cluster_cores: Sequence[int] = (64, 512)) -> dict:
    """Extrapolations from the measured rows (see the module doc). Every number is a projection."""
    out: dict = {"label": "PROJECTION from this run's measurements, not measured at these sizes", "targets": list(targets)}
    if encode:
        per_core = max(r["tiles_per_s_per_core"] for r in encode["rows"])
        out["tiles_per_s_per_core"] = per_core
        out["encode"] = [{"tiles": t, "core_hours": round(t / per_core / 3600, 1),
                          **{f"wall_h_{c}_cores": round(t / per_core / c / 3600, 2) for c in cluster_cores}} for t in targets]
    vec_bytes = 4 * dim

    def flat_rows(store: str) -> list[dict]:
        return sorted((r for r in search if r["store"] == store and r["kind"] == "flat"), key=lambda r: r["n"])

    meta = flat_rows(REFERENCE_STORE)
    hn = sorted((r for r in search if r["store"] == REFERENCE_STORE and r["kind"] == "hnsw"), key=lambda r: r["n"])
    # the other stores measured (as named in the rows, so that an old run re-renders as it was)
    others = {_key(name): rows for name in dict.fromkeys(r["store"] for r in search) if name != REFERENCE_STORE
              if (rows := flat_rows(name))}
    gb = {"vectors_float32": round(vec_bytes * 1e6 / 1e9, 2),
          "faiss_flat": round(meta[-1]["bytes_per_vector"] * 1e6 / 1e9, 2) if meta else None,
          "faiss_hnsw": round(hn[-1]["bytes_per_vector"] * 1e6 / 1e9, 2) if hn else None}
    gb.update({f"{key}_flat_with_metadata": round(rows[-1]["bytes_per_vector"] * 1e6 / 1e9, 2) for key, rows in others.items()})
    gb["index_folder_embeddings_npy"] = round(vec_bytes * 1e6 / 1e9, 2)
    out["gb_per_million_tiles"] = gb
    if meta:
        # exact search is a scan: p50 ~ fixed + per_million * n/1e6, fitted over the measured sizes
        fits = {"faiss": _linear_fit(meta), **{key: _linear_fit(rows) for key, rows in others.items()}}
        for key, (fix, pm) in fits.items():
            out[f"{key}_flat_fit"] = {"fixed_ms": round(fix, 3), "ms_per_million": round(pm, 2)}
        lat = []
        for t in targets:
            for sh in shards:
                row = {"tiles": t, "shards": sh, **{f"{key}_flat_ms": round(fix + pm * t / 1e6 / sh, 1) for key, (fix, pm) in fits.items()}}
                row["ram_gb_per_shard"] = round(vec_bytes * t / sh / 1e9, 1)
                lat.append(row)
        out["query_latency_ms"] = lat
    if hn:
        rk = next(k_ for k_ in hn[0] if k_.startswith("recall@"))
        out["hnsw_measured"] = [{"n": r["n"], "p50_ms": r["p50_ms"], rk: r[rk]} for r in hn]
    return out


def _key(store: str) -> str:
    """A store's benchmark name as a JSON key prefix (``"a-b"`` -> ``"a_b"``)."""
    return store.replace("-", "_")


def _title(store_key: str) -> str:
    """The prose name of a store from its key prefix (its ``bench_title``, else the key)."""
    from rsitr.retrieval.stores import bench_titles

    return {_key(n): t for n, t in bench_titles().items()}.get(store_key, store_key.replace("_", " "))


def _linear_fit(rows: list[dict]) -> tuple[float, float]:
    """``(fixed ms, ms per million vectors)`` of ``p50 = fixed + slope * n`` (least squares over the
    sizes; one size, or a fit with a negative part: a line through the origin)."""
    n = np.array([r["n"] for r in rows], float) / 1e6
    y = np.array([r["p50_ms"] for r in rows], float)
    if len(rows) == 1 or np.ptp(n) == 0:
        return 0.0, float(y.mean() / n.mean())
    slope, fixed = np.polyfit(n, y, 1)
    if fixed < 0 or slope <= 0:  # noise at small sizes: a scan through the origin instead
        return 0.0, float((n @ y) / (n @ n))
    return float(fixed), float(slope)


# -- report ----------------------------------------------------------------------------------------
def render(res: dict, k: int) -> str:
    lines = [f"# rsitr bench scale ({res['machine']['cpus']} CPUs, load average {res['machine']['load']} at start; shared machine)", ""]
    e = res.get("encode")
    if e:
        lines += [f"## Encode: {e['n']} images of {e['images']}, {e['model']}, batch {e['batch_size']}, engine {e['engine']} "
                  f"(local Ray started once in {e['ray_start_s']} s, not counted)", "",
                  "| executor | workers | cores | tiles | seconds | tiles/s | tiles/s per core | max abs diff vs single | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in e["rows"]:
            lines.append(f"| {r['executor']} | {r['workers']} | {r['cores']} | {r['tiles']} | {r['seconds']} | {r['tiles_per_s']} | "
                         f"{r['tiles_per_s_per_core']} | {r['max_abs_diff']:.1e} | {r['note']} |")
        lines.append("")
    if res.get("search"):
        lines += [f"## Search: random unit vectors, one query per call, recall@{k} vs exact numpy", "",
                  f"| n | store | index | params | build/insert s | p50 ms | p95 ms | recall@{k} | bytes/vector on disk |",
                  "|---:|---|---|---|---:|---:|---:|---:|---:|"]
        for r in res["search"]:
            lines.append(f"| {r['n']:,} | {r['store']} | {r['kind']} | {r['params']} | {r['build_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                         f"{r[f'recall@{k}']} | {r['bytes_per_vector']} |")
        lines.append("")
    p = res.get("projection")
    if p:
        lines += ["## Cost model - " + p["label"], ""]
        if "encode" in p:
            cores = [c for c in p["encode"][0] if c.startswith("wall_h_")]
            lines += [f"Encoding at the best measured {p['tiles_per_s_per_core']} tiles/s per core:", "",
                      "| tiles | core-hours | " + " | ".join(f"wall hours on {c[7:].replace('_', ' ')}" for c in cores) + " |",
                      "|---:|---:|" + "---:|" * len(cores)]
            for r in p["encode"]:
                lines.append(f"| {r['tiles']:,} | {r['core_hours']:,} | " + " | ".join(str(r[c]) for c in cores) + " |")
            lines.append("")
        g = p["gb_per_million_tiles"]
        lines += ["GB per million tiles: " + ", ".join(f"{k_.replace('_', ' ')} {v}" for k_, v in g.items() if v is not None), ""]
        if "query_latency_ms" in p:
            keys = [c[: -len("_flat_ms")] for c in p["query_latency_ms"][0] if c.endswith("_flat_ms")]  # the reference store first
            fits = "; ".join(f"{_title(key)} {p[f'{key}_flat_fit']['fixed_ms']} ms + {p[f'{key}_flat_fit']['ms_per_million']} ms per million"
                             + (" vectors (1 thread)" if key == _key(REFERENCE_STORE) else "") for key in keys)
            lines += [f"Exact (flat) search p50, a scan fitted over the measured sizes ({fits}), each shard scanned in parallel "
                      f"by its own core (merging k results per shard not counted):", "",
                      "| tiles | shards | " + "".join(f"{_title(key)} flat ms | " for key in keys) + "RAM GB per shard |",
                      "|---:|---:|" + "---:|" * len(keys) + "---:|"]
            for r in p["query_latency_ms"]:
                lines.append(f"| {r['tiles']:,} | {r['shards']} | " + "".join(f"{r[f'{key}_flat_ms']:,} | " for key in keys)
                             + f"{r['ram_gb_per_shard']} |")
            lines.append("")
        if p.get("hnsw_measured"):
            lines.append("FAISS HNSW as measured (latency grows ~log n per shard, so it stays in this range at 10M-100M per shard; "
                         "recall depends on the data - random vectors are its worst case - and on efSearch): "
                         + ", ".join(f"n={r['n']:,}: p50 {r['p50_ms']} ms at {[k_ for k_ in r if k_.startswith('recall@')][0]} "
                                     f"{[v for k_, v in r.items() if k_.startswith('recall@')][0]}" for r in p["hnsw_measured"]))
    return "\n".join(lines)


def load_result(path: str | Path) -> dict:
    """The JSON a previous ``rsitr bench scale`` printed (alone, or followed by its markdown)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        res, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except (OSError, ValueError) as exc:
        raise RsitrError(f"{p}: not the JSON output of `rsitr bench scale` ({exc})") from exc
    if not isinstance(res, dict) or "machine" not in res:
        raise RsitrError(f"{p}: not the JSON output of `rsitr bench scale` (no 'machine' entry)")
    return res


def rerender(path: str | Path, dim: int = 256) -> dict:
    """A previous run's result (:func:`load_result`) with its projection recomputed from its
    measurements (which stay as they were); ``dim``: the vector dimension when it has no search part."""
    res = load_result(path)
    res["projection"] = projection(res.get("encode"), res.get("search") or [], int(res["search"][0]["dim"]) if res.get("search") else dim)
    return res


def run(*, images: str | Path | None = None, checkpoint: str = "towers:efficientnet-lite0+minilm-l6", limit: int | None = None,
        workers: Sequence[int] = (1, 2), batch_size: int = 32, engine: str = "auto", sizes: Sequence[int] = (100_000,),
        kinds: Sequence[str] = ("flat", "hnsw"), flat_only_above: int = 200_000, dim: int = 256, queries: int = 200, k: int = 10,
        encode: bool = True, search: bool = True, stores: Sequence[str] | None = None, workdir: str | Path | None = None,
        progress: bool = True) -> dict:
    """The three parts of the module docstring, one result: ``machine``, ``encode`` (unless not
    ``encode``), ``search`` (unless not ``search``; in ``stores``, default every available store
    with a benchmark, :func:`bench_stores`) and ``projection``.
    Intermediate files go to ``workdir`` (kept) or a temporary folder (removed).

    It writes no result file: ``rsitr bench scale`` prints the JSON (and the markdown after it) and
    :func:`rerender` reads that output back, so the harness's writer
    (:func:`rsitr.bench.measurements.write_result`) has nothing to write here."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rsitr-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"cpus": os.cpu_count(), "load": round(os.getloadavg()[0], 2), "python": platform.python_version()}}
    try:
        if encode:
            res["encode"] = run_encode_bench(images, checkpoint, limit, list(workers), batch_size, work / "encode",
                                             engine=engine, progress=progress)
        if search:
            res["search"] = run_search_bench(list(sizes), dim, queries, k, work, kinds=kinds, stores=stores,
                                             flat_only_above=flat_only_above)
        res["projection"] = projection(res.get("encode"), res.get("search") or [], dim)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
    return res
