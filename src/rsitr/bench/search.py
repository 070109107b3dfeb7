"""Search benchmarks (``rsitr bench search``) and a sample imagery writer for tests and demos.

* :func:`run_search_bench`: query latency p50/p95 (one query at a time, as a user's search) of
  exact (flat) vs IVF vs HNSW :class:`~rsitr.retrieval.index.VectorIndex` over ``n`` random unit
  vectors, and recall@k of the approximate kinds against exact search on the same queries
  (|approx top-k ∩ exact top-k| / k, averaged; the exact top-k is computed once per size, so
  recall is reported whichever kinds are timed). Kind ``auto``: the index ``--index-kind auto``
  builds. Also the index build time.
* :func:`run_build_bench`: index-build throughput (tiles/s, encoding only and end to end, time per
  stage) of a model on a generated source folder (:func:`write_sample_source`) or a folder of
  images, against the eager torch encode of the same model on the same tiles.

Data: ``"random"`` = i.i.d. Gaussian vectors, L2-normalised (the worst case for approximate
search: no cluster structure); ``"clustered"`` = a Gaussian mixture (``n // 100`` centres, closer
to real embedding archives). Queries are drawn from the same distribution (not from the base).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


# -- sample imagery --------------------------------------------------------------------------------
def write_sample_source(out: str | Path, n_png: int = 4, *, geotiff: bool = True, grid: tuple[int, int] = (2, 3), tile: int = 128,
                        seed: int = 0, crs: str = "EPSG:32633", origin: tuple[float, float] = (500000.0, 5000000.0), res: float = 10.0) -> Path:
    """A small folder of synthetic aerial images: ``n_png`` PNG tiles (``png/``), and, with
    ``geotiff``, one 4-band uint16 GeoTIFF scene (``scene.tif``) mosaicked from a ``grid`` of
    synthetic tiles (``tile`` px each) with a north-up transform at ``origin`` (``res`` m pixels,
    ``crs``) and nodata 0 in a 5-pixel left border."""
    from rsitr.data.synth import CLASSES, generate

    out = Path(out)
    (out / "png").mkdir(parents=True, exist_ok=True)
    for i in range(n_png):
        _, _, img = generate(i, CLASSES[i % len(CLASSES)], seed, tile)
        img.save(out / "png" / f"tile_{i:04d}.png")
    if geotiff:
        import rasterio
        from rasterio.transform import from_origin

        rows, cols = grid
        mosaic = np.zeros((rows * tile, cols * tile, 3), np.uint8)
        for r in range(rows):
            for c in range(cols):
                j = 1000 + r * cols + c
                _, _, img = generate(j, CLASSES[j % len(CLASSES)], seed, tile)
                mosaic[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.asarray(img.convert("RGB"))
        data = mosaic.astype(np.uint16) * 16 + 100  # 12-bit-like values in a 16-bit container
        nir = data.mean(axis=-1, keepdims=True).astype(np.uint16)
        bands = np.concatenate([data, nir], axis=-1).transpose(2, 0, 1)
        bands[:, :, :5] = 0  # nodata border
        with rasterio.open(out / "scene.tif", "w", driver="GTiff", width=cols * tile, height=rows * tile, count=4, dtype="uint16",
                           crs=crs, transform=from_origin(origin[0], origin[1], res, res), nodata=0) as ds:
            ds.write(bands)
    return out


# -- vector search ---------------------------------------------------------------------------------
def _vectors(n: int, dim: int, rng: np.random.Generator, data: str, centres: np.ndarray | None = None) -> np.ndarray:
    if data == "random":
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        assign = rng.integers(0, len(centres), n)
        x = centres[assign] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_search_bench(sizes: Sequence[int] = (10_000, 1_000_000), dim: int = 256, kinds: Sequence[str] = ("flat", "ivf", "hnsw"),
                     n_queries: int = 200, k: int = 10, data: str = "random", seed: int = 0, nprobe: int = 16, hnsw_m: int = 32,
                     ef_search: int = 128, threads: int | None = 1, progress: bool = True, target_recall: float = 0.95) -> list[dict]:
    """One row per (n, kind): build seconds, p50/p95/mean query latency (ms, one query per call,
    ``threads`` FAISS threads), recall@k vs exact search - always: the exact neighbours of the
    query sample are computed once per size (FAISS flat), whichever kinds are timed. Kind
    ``auto`` is what ``rsitr index build --index-kind auto`` builds
    (:func:`rsitr.retrieval.autoindex.auto_index`, tuned to ``target_recall``)."""
    from rsitr.retrieval.autoindex import auto_index, exact_neighbours, recall_at_k
    from rsitr.retrieval.index import VectorIndex, load_faiss

    faiss = load_faiss()

    build_threads = faiss.omp_get_max_threads()
    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        centres = None
        if data == "clustered":
            centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
        xb = _vectors(n, dim, rng, data, centres)
        xq = _vectors(n_queries, dim, rng, data, centres)
        exact = exact_neighbours(xb, xq, k)  # the recall reference, once per size
        for kind in kinds:
            faiss.omp_set_num_threads(build_threads)
            t0 = time.perf_counter()
            if kind == "auto":
                vi, record = auto_index(xb, target_recall, k=k)
                params = f"{record['kind']} {' '.join(f'{a}={b}' for a, b in record['params'].items())} (tuned R@{k} {record[f'recall@{k}']:.3f})"
            else:
                vi = VectorIndex(dim, kind, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, normalize=False)
                vi.add(xb)
                params = {"flat": "", "ivf": f"nlist={vi.nlist} nprobe={min(nprobe, vi.nlist or nprobe)}",
                          "hnsw": f"M={hnsw_m} efSearch={ef_search}"}[kind]
            build = time.perf_counter() - t0
            if threads:
                faiss.omp_set_num_threads(int(threads))  # query threads (builds use all of FAISS's)
            vi.search(xq[:1], k)  # warm-up
            lat, ids = [], []
            for i in range(n_queries):
                t1 = time.perf_counter()
                _, I = vi.search(xq[i : i + 1], k)
                lat.append((time.perf_counter() - t1) * 1e3)
                ids.append(I[0])
            rec = recall_at_k(np.stack(ids), exact, k)
            row = {"n": n, "dim": dim, "kind": kind, "data": data, "build_s": round(build, 2), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                   "p95_ms": round(float(np.percentile(lat, 95)), 3), "mean_ms": round(float(np.mean(lat)), 3), f"recall@{k}": round(rec, 4),
                   "params": params}
            rows.append(row)
            if progress:
                log.info("search bench: %s", row)
            del vi
        del xb
    faiss.omp_set_num_threads(build_threads)
    return rows


def render_search(rows: list[dict], k: int = 10) -> str:
    head = f"| n | kind | params | build s | p50 ms | p95 ms | recall@{k} vs exact |\n|---:|---|---|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['kind']} | {r['params']} | {r['build_s']:.2f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r[f'recall@{k}']:.4f} |")
    return "\n".join(lines)


# -- build throughput ------------------------------------------------------------------------------
def run_build_bench(models: Sequence[str] = ("clip:tiny", "towers:efficientnet-lite0+minilm-l6"), n_tiles: int = 200, tile: int = 128,
                    batch_size: int = 32, workdir: str | Path | None = None, progress: bool = False, source: str | Path | None = None,
                    tta: int = 1, workers: int | None = None, reference: bool = True, reference_batches: int = 3) -> list[dict]:
    """Index-build throughput per model over ``n_tiles`` generated tiles (PNG tiles + GeoTIFF
    tiles, about half each) or the images of ``source`` (the first ``n_tiles``): encoding-only
    tiles/s (model forward) and end-to-end tiles/s (read + preprocess + encode + write), model
    loading and graph export excluded, the time per stage, and - with ``reference`` - the rate of
    the reference: eager torch ``encode_image`` of the same model on batches of the same tiles
    (already decoded, median of ``reference_batches``), with end to end as a multiple of it."""
    import shutil
    import statistics

    import torch

    from rsitr.data.transforms import EvalTransform
    from rsitr.models.engine import engine_for
    from rsitr.search.build import BuildOptions, build_index, load_model
    from rsitr.search.sources import read_item, scan_source

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rsitr-bench-"))
    if source is None:
        n_geo = n_tiles // 2
        cols = 10
        rows_ = max(1, n_geo // cols)
        src = write_sample_source(tmp / "source", n_png=n_tiles - rows_ * cols, grid=(rows_, cols), tile=tile)
    else:  # the first n_tiles images of a folder, linked into one of their own
        src = tmp / "source"
        src.mkdir(parents=True, exist_ok=True)
        for it in scan_source(source, tile, 0)[:n_tiles]:
            link = src / Path(it.path).name
            if not link.exists():
                link.symlink_to(it.path)
    out = []
    for m in models:
        model = load_model(m)
        idx = tmp / ("index-" + m.replace(":", "_").replace("+", "_").replace("/", "_"))
        shutil.rmtree(idx, ignore_errors=True)
        engine_for(model.backbone, "auto").describe()  # export the graphs outside the timing
        r = build_index(src, m, idx, BuildOptions(tile_size=tile, batch_size=batch_size, progress=progress, tta=tta, workers=workers),
                        model=model)
        row = {"model": m, "tiles": r.encoded, "image_size": model.preprocess.image_size, "embed_dim": int(model.backbone.embed_dim), "tta": tta,
               "encode_tiles_per_s": round(r.tiles_per_s, 1), "end_to_end_tiles_per_s": round(r.encoded / r.seconds, 1),
               "seconds": round(r.seconds, 2), "profile": r.profile}
        if reference:
            tf = EvalTransform(model.preprocess)
            items = scan_source(src, tile, 0)[:batch_size]
            px = torch.stack([tf(read_item(it)) for it in items])
            times = []
            with torch.no_grad():
                model.backbone.encode_image(px)  # warm-up
                for _ in range(max(1, reference_batches)):
                    t0 = time.perf_counter()
                    model.backbone.encode_image(px)
                    times.append(time.perf_counter() - t0)
            eager = len(px) / statistics.median(times)
            row["eager_encode_tiles_per_s"] = round(eager, 1)
            row["end_to_end_x_eager"] = round(row["end_to_end_tiles_per_s"] / eager, 2)
        out.append(row)
    return out


def render_build(rows: list[dict]) -> str:
    from rsitr.search.pipeline import format_profile

    lines = ["| model | tiles | input px | dim | tta | encode tiles/s | end-to-end tiles/s | eager torch encode tiles/s | end to end / eager | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tiles']} | {r['image_size']} | {r['embed_dim']} | {r.get('tta', 1)} | {r['encode_tiles_per_s']} | "
                     f"{r['end_to_end_tiles_per_s']} | {r.get('eager_encode_tiles_per_s', '-')} | {r.get('end_to_end_x_eager', '-')} | {r['seconds']} |")
    for r in rows:
        if r.get("profile"):
            lines.append(f"\n{r['model']}: {format_profile(r['profile'])}")
    return "\n".join(lines)


# -- the measurements --------------------------------------------------------------------------------
def vector_search(k: int = 10, **kw) -> dict:
    """:func:`run_search_bench` as a measurement result: ``{"k", "rows"}``."""
    return {"k": k, "rows": run_search_bench(k=k, **kw)}


def index_build(**kw) -> dict:
    """:func:`run_build_bench` as a measurement result: ``{"rows"}``."""
    return {"rows": run_build_bench(**kw)}


def _search_on_cell(ctx, params: dict) -> dict:
    """``vector_search`` at the cell's embedding dimension (``params``: the options of
    :func:`run_search_bench`, e.g. ``sizes: [10000]``)."""
    return vector_search(**{"dim": int(ctx.loaded.backbone.embed_dim), "sizes": (10_000,), "progress": False, **params})


def _build_on_cell(ctx, params: dict) -> dict:
    """``index_build`` with the cell's checkpoint (``params``: e.g. ``n_tiles: 50``)."""
    return index_build(**{"models": (ctx.source,), **params})


def _render_vector_search(result: dict) -> str:
    return render_search(result["rows"], result["k"])


def _render_index_build(result: dict) -> str:
    return render_build(result["rows"])


def _register() -> None:
    from rsitr.bench.measurements import Measurement, keyword_check, per_method, register_measurement

    register_measurement(Measurement("vector_search", "Vector search: flat vs ivf vs hnsw", per_method(_render_vector_search),
                                     on_cell=_search_on_cell, run=vector_search, render_one=_render_vector_search,
                                     check=keyword_check("vector_search", run_search_bench, exclude=("dim", "progress"))))
    register_measurement(Measurement("index_build", "Index-build throughput", per_method(_render_index_build), on_cell=_build_on_cell,
                                     run=index_build, render_one=_render_index_build,
                                     check=keyword_check("index_build", run_build_bench, exclude=("models", "progress"))))


_register()
