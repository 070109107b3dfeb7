"""Index build on Ray Data: ``rsitr index build SOURCE ... --executor ray [--ray-address ADDR]``.

The same index as :func:`rsitr.search.build.build_index` (same manifest apart from timings, same
items in the same order, the same vectors within float rounding), produced by a Ray Data
pipeline so the encoding can use every core of a cluster:

1. **list**: the image files under SOURCE (one directory walk on the driver) become a Ray
   dataset; tasks open each file and cut georeferenced rasters into windows
   as the index's tiling says (:func:`rsitr.search.sources.scan_scene`: metres or pixels, mostly
   no-data tiles skipped), returning item records that the driver sorts into the single-process
   build's order (sorted paths, tiles row-major) and each scene's log lines, logged by the driver.
2. **decode/tile**: tasks read each pending item's pixels (:func:`~rsitr.search.sources.read_item`)
   and apply the model's evaluation transform (``--batch-size`` items per task call).
3. **encode**: an actor pool of ``--ray-workers`` encoders; each actor loads the model once
   (refusing weights whose hash differs from the manifest's - a node with another file), and runs
   it through the inference engine (:mod:`rsitr.models.engine`: ONNX Runtime where installed,
   torch otherwise) with ``cpus_per_worker`` threads.
4. **shards**: the driver collects the vectors per shard (``--shard-size`` items) and writes each
   finished shard atomically as Parquet, ``INDEX/shards/shard-NNNNNN.parquet`` with columns
   ``id`` (the item id it will get), ``key``, ``path``, ``window``, ``bounds``, ``crs``,
   ``west/south/east/north`` (WGS84 footprint), ``extra`` (the item's extra fields as JSON: a metre
   tile's ``scale_m``, read size ``px``...) and ``vector`` (float32, L2-normalised).
5. **index**: when every pending item is in a shard, the shards are merged like the
   single-process chunks (:func:`rsitr.search.build.commit_generation`): items in listing order,
   a new generation of the item table, embeddings and vector store (any registered store), the manifest
   switched atomically, then the shards removed.

Resume: a shard is written whole or not at all, so a driver killed at any point leaves complete
shards behind; running the same command again encodes only the items that are neither in the
index nor in a shard (at most one shard's worth of work per worker is lost). Without
``--ray-address`` a local Ray is started (``num_cpus`` logical CPUs, dashboard off, usage
statistics off; Ray binds it to this machine's own address) and stopped at the end; with an address the driver joins that cluster, whose workers
must have rsitr installed and see SOURCE at the same path (and the model file, for a checkpoint).
``--keep-tokens`` (FTF's patch tokens) is not supported on this path yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rsitr.data.images import max_pixels as pixel_limit
from rsitr.search import build as B
from rsitr.search import manifest as M
from rsitr.search.manifest import IndexManifest, load_model, model_identity
from rsitr.search.sources import Item
from rsitr.utils.errors import DataError, RsitrError
from rsitr.utils.io import atomic_path

log = logging.getLogger(__name__)

SHARDS = "shards"
EXECUTORS = ("local", "ray")


@dataclasses.dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray; else join the cluster at this address ("auto" = the running one)
    workers: int = 1  # encoder actors
    cpus_per_worker: float = 1.0  # CPUs (and intra-op threads) per encoder actor
    decode_cpus: float = 0.5  # CPUs reserved per decode/tile task
    num_cpus: int | None = None  # logical CPUs of a local Ray (default: workers * cpus_per_worker + 1)
    shard_size: int = 1024  # items per Parquet shard (the unit of resume)


def _ray():
    try:
        import ray  # noqa: PLC0415 (lazy: optional dependency)
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RsitrError("--executor ray needs Ray Data: pip install 'rsitr[scale]' (ray[data])") from exc
    return ray


LOCAL_START_ATTEMPTS = 3
LOCAL_RETRY_WAIT_S = 5.0


def _start_timed_out(exc: Exception) -> bool:
    """Whether a failed ``ray.init`` looks like a start-up timeout of a loaded machine (worth a new
    start): the GCS port file not written in time (a RuntimeError "Timed out waiting for file ...
    gcs_server_port..."), the GCS not answering in its start-up window (RuntimeError "Failed to start
    GCS ..."), or the raylet not registered within Ray's fixed 30 s (a bare Exception saying the
    node "timed out during startup"). Any other error (a bad argument, a dead process, a cluster
    that refuses) fails at once."""
    if not (isinstance(exc, RuntimeError) or type(exc) is Exception):
        return False
    text = str(exc).lower()
    return "timed out" in text or text.startswith("failed to start gcs")


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """A Ray to run on: the one already initialised in this process, else a new local one (or
    the cluster at ``address``), shut down on exit if this call started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        t0 = time.perf_counter()
        # a local start on a loaded machine can miss Ray's own start-up timeouts (its GCS server's
        # port file, the raylet's registration): start again, up to LOCAL_START_ATTEMPTS times; joining
        # a cluster is not retried; whatever fails in the end is one RsitrError line
        attempts = 1 if address else LOCAL_START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                if address:
                    ray.init(address=address, **kw)
                else:
                    ray.init(num_cpus=int(num_cpus or 2), **kw)  # one node on this machine
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its raylet misses the 30 s start-up wait
                if attempt < attempts and _start_timed_out(exc):
                    log.warning("ray: local start failed (%s); starting again (%d of %d)", str(exc).splitlines()[0][:200], attempt + 1, attempts)
                    ray.shutdown()
                    time.sleep(LOCAL_RETRY_WAIT_S)
                    continue
                try:  # what a failed start left running (a GCS server, a raylet) goes with it
                    ray.shutdown()
                except Exception:  # noqa: BLE001 - the start's own error is the one to report
                    log.debug("ray: shutdown after a failed start failed", exc_info=True)
                raise RsitrError(f"cannot start or join Ray{f' at {address}' if address else ''}: {exc}") from exc
        started = True
        log.info("ray: %s in %.1fs (%s)", "joined " + address if address else "started locally", time.perf_counter() - t0,
                 ray.cluster_resources())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one tqdm bar of our own
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset execution plans
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# -- stage functions (run in Ray tasks / actors) --------------------------------------------------
def _scan_batch(batch: dict, tiling: dict, max_pixels: int | None = None) -> dict:
    """Files -> item records (one row per item; a file that cannot be read gives an error row; a
    file's no-data count and log lines come in a row of their own, ``tile`` -1)."""
    from rsitr.search.sources import Tiling, scan_scene

    _use_pixel_limit(max_pixels)
    t = Tiling(**tiling)
    fidx, tidx, recs, errs, notes, nodata = [], [], [], [], [], []
    for f, path in zip(batch["file"].tolist(), batch["path"].tolist()):
        try:
            scan = scan_scene(Path(path), t)
            rows = [(t_, json.dumps(it.to_json()), "", "", 0) for t_, it in enumerate(scan.items)]
            if scan.notes or scan.skipped_nodata:
                rows.append((-1, "", "", json.dumps(scan.notes), scan.skipped_nodata))
        except DataError as exc:
            rows = [(0, "", str(exc), "", 0)]
        for t_, rec, err, note, nd in rows:
            fidx.append(f)
            tidx.append(t_)
            recs.append(rec)
            errs.append(err)
            notes.append(note)
            nodata.append(nd)
    return {"file": np.array(fidx, np.int64), "tile": np.array(tidx, np.int64), "item": np.array(recs, object),
            "error": np.array(errs, object), "notes": np.array(notes, object), "nodata": np.array(nodata, np.int64)}


def _use_pixel_limit(max_pixels: int | None) -> None:
    """A Ray worker is a process of its own: the driver's ``rsitr --max-pixels`` is set in it here,
    at every batch (a worker runs tasks of several builds)."""
    if max_pixels is not None:
        from rsitr.data.images import set_max_pixels

        set_max_pixels(int(max_pixels))


def _decode_batch(batch: dict, preprocess, max_pixels: int | None = None) -> dict:
    """Item records -> pixel tensors (the model's eval transform); unreadable items (or over the
    driver's pixel limit) get an error."""
    from rsitr.data.transforms import EvalTransform
    from rsitr.search.sources import read_item

    _use_pixel_limit(max_pixels)
    tf = EvalTransform(preprocess)
    px, errs = [], []
    for rec in batch["item"].tolist():
        try:
            px.append(tf(read_item(Item.from_json(json.loads(rec)))).numpy())
            errs.append("")
        except DataError as exc:
            px.append(None)
            errs.append(str(exc))
    shape = next((p.shape for p in px if p is not None), (3, preprocess.image_size, preprocess.image_size))
    pixels = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in px]).astype(np.float32, copy=False)
    return {"seq": batch["seq"], "shard": batch["shard"], "error": np.array(errs, object), "pixels": pixels}


class TileEncoder:
    """Ray actor: the model loaded once, batches of pixels -> L2-normalised embeddings."""

    def __init__(self, checkpoint: str, state_sha256: str, engine: str = "auto", onnx_cache: str | None = None,
                 device: str = "cpu", threads: int = 1):
        import torch

        from rsitr.models.engine import engine_for

        torch.set_num_threads(max(1, int(threads)))  # also the ONNX Runtime intra-op threads
        model = M.load_model(checkpoint, device)  # the LoadedModel: backbone + the method it was trained with
        got = M.state_sha256(model)
        if got != state_sha256:
            raise RsitrError(f"encoder on this node loaded {checkpoint} with weights sha256 {got[:12]}, the index expects "
                             f"{state_sha256[:12]}: every node must see the same model file")
        self.dim = int(model.backbone.embed_dim)
        self.device = device
        self.encoder = engine_for(model.backbone, engine, cache_dir=onnx_cache)

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.array([e == "" for e in batch["error"].tolist()], bool)
        vec = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            px = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            vec[ok], _, _ = B.encode_batch(self.encoder, px.to(self.device), False)
        return {"seq": batch["seq"], "shard": batch["shard"], "error": batch["error"], "vector": vec}


# -- shards ----------------------------------------------------------------------------------------
def _shard_files(index_dir: Path) -> list[Path]:
    d = index_dir / SHARDS
    return sorted(d.glob("shard-*.parquet")) if d.is_dir() else []


def _pq():
    import pyarrow as pa  # noqa: PLC0415 (installed with ray[data])
    import pyarrow.parquet as pq  # noqa: PLC0415

    return pa, pq


def write_shard(path: Path, items: list[Item], ids: list[int], vectors: np.ndarray, state_sha256: str) -> Path:
    """One Parquet shard, written atomically (schema in the module doc)."""
    pa, pq = _pq()
    geo = [it.wgs84 if it.wgs84 else None for it in items]
    cols = {
        "id": pa.array(ids, pa.int64()),
        "key": pa.array([it.key for it in items], pa.string()),
        "path": pa.array([it.path for it in items], pa.string()),
        "window": pa.array([it.window for it in items], pa.list_(pa.int64())),
        "bounds": pa.array([it.bounds for it in items], pa.list_(pa.float64())),
        "crs": pa.array([it.crs for it in items], pa.string()),
        "extra": pa.array([json.dumps(it.extra) if it.extra else None for it in items], pa.string()),
    }
    for j, name in enumerate(("west", "south", "east", "north")):
        cols[name] = pa.array([g[j] if g else None for g in geo], pa.float64())
    v = np.ascontiguousarray(vectors, np.float32)
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), v.shape[1])
    table = pa.table(cols).replace_schema_metadata({"rsitr_state_sha256": state_sha256, "rsitr_embed_dim": str(v.shape[1])})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_shard(path: Path, state_sha256: str, columns: list[str] | None = None) -> dict | None:
    """``{"items": [Item], "ids": [int], "vectors": float32 [n, d]}`` (only ``key`` with
    ``columns=["key"]``); None for a shard that is unreadable or from another model (dropped:
    shards are written atomically, so that is outside damage, and its items are encoded again)."""
    _, pq = _pq()
    try:
        t = pq.read_table(path, columns=columns)
        meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
        if meta.get("rsitr_state_sha256") != state_sha256:
            raise ValueError("written with another model")
        if columns == ["key"]:
            return {"keys": t.column("key").to_pylist()}
        d = t.to_pydict()
        items = []
        for i in range(t.num_rows):
            wgs = [d[c][i] for c in ("west", "south", "east", "north")]
            extra = d["extra"][i] if "extra" in d else None  # shards written before metre tiles have no extra column
            items.append(Item(key=d["key"][i], path=d["path"][i], window=d["window"][i], bounds=d["bounds"][i], crs=d["crs"][i],
                              wgs84=wgs if wgs[0] is not None else None, extra=json.loads(extra) if extra else {}))
        vec = t.column("vector").combine_chunks()
        dim = vec.type.list_size
        vectors = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        return {"items": items, "ids": d["id"], "vectors": vectors}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s: unusable shard (%s); its items will be encoded again", path, exc)
        path.unlink(missing_ok=True)
        return None


# -- the build -------------------------------------------------------------------------------------
def build_index_ray(source: str | os.PathLike, checkpoint: str, out: str | os.PathLike, opts: B.BuildOptions | None = None,
                    ray_opts: RayOptions | None = None, *, model=None, encoder_cls: type | None = None) -> B.BuildResult:
    """:func:`rsitr.search.build.build_index` on Ray (see the module doc); ``model``: the
    :class:`~rsitr.methods.factory.LoadedModel` of ``checkpoint`` when already loaded (the actors
    load their own copy and must hash to the same weights)."""
    opts = opts or B.BuildOptions()
    _check(opts, ray_opts or RayOptions())
    out, manifest, model = B.open_for_build(source, checkpoint, out, opts, model=model)
    return _update_ray(out, manifest, model.backbone, checkpoint, source, opts, ray_opts or RayOptions(), encoder_cls or TileEncoder)


def add_to_index_ray(index_dir: str | os.PathLike, source: str | os.PathLike, opts: B.BuildOptions | None = None,
                     ray_opts: RayOptions | None = None, *, checkpoint: str | None = None, model=None) -> B.BuildResult:
    """:func:`rsitr.search.build.add_to_index` on Ray."""
    index_dir = Path(index_dir)
    manifest = IndexManifest.load(index_dir)
    opts = B.for_manifest(opts or B.BuildOptions(), manifest)
    _check(opts, ray_opts or RayOptions())
    spec = checkpoint or manifest.model.checkpoint
    model = model if model is not None else load_model(spec, opts.device)
    manifest.check_model(model_identity(spec, model), index_dir)
    return _update_ray(index_dir, manifest, model.backbone, spec, source, opts, ray_opts or RayOptions(), TileEncoder, adding=True)


def _check(opts: B.BuildOptions, ro: RayOptions) -> None:
    if opts.keep_tokens:
        raise RsitrError("--keep-tokens is not supported with --executor ray (the token store is built by the local executor only)")
    if opts.tta != 1:
        raise RsitrError(f"test-time views (tta {opts.tta}) are encoded by the local executor only; use --executor local")
    if ro.workers < 1 or ro.shard_size < 1 or ro.cpus_per_worker <= 0 or ro.decode_cpus <= 0:
        raise RsitrError(f"--ray-workers, --shard-size must be >= 1 and CPU shares > 0 (got workers {ro.workers}, "
                         f"shard size {ro.shard_size}, cpus/worker {ro.cpus_per_worker}, decode cpus {ro.decode_cpus})")


def _list_items(ray, src: Path, tiling, opts: B.BuildOptions, ro: RayOptions) -> tuple[list[Item], int]:
    """Every item under ``src``, listed by Ray tasks, in the single-process build's order, and the
    number of tiles skipped as mostly no-data (each scene's notes are logged here, on the driver)."""
    import dataclasses as dc
    import logging as lg

    from rsitr.search.sources import iter_image_files

    tiling.check()
    files = [str(p) for p in iter_image_files(src)]
    if not files:
        return [], 0
    ds = ray.data.from_items([{"file": i, "path": p} for i, p in enumerate(files)], override_num_blocks=min(len(files), 64))
    ds = ds.map_batches(_scan_batch, fn_kwargs={"tiling": dc.asdict(tiling), "max_pixels": pixel_limit()}, batch_size=64, batch_format="numpy",
                        num_cpus=ro.decode_cpus)
    rows = sorted(ds.take_all(), key=lambda r: (int(r["file"]), int(r["tile"]) if int(r["tile"]) >= 0 else 1 << 62))
    items, nodata = [], 0
    for r in rows:
        if r["error"]:
            if not opts.skip_bad:
                raise DataError(r["error"])
            log.warning("skipped: %s", r["error"])
            continue
        if int(r["tile"]) < 0:
            nodata += int(r["nodata"])
            for level, msg in json.loads(r["notes"] or "[]"):
                lg.getLogger("rsitr.search.sources").log(int(level), "%s", msg)
            continue
        items.append(Item.from_json(json.loads(r["item"])))
    return items, nodata


def _update_ray(index_dir: Path, manifest: IndexManifest, model, checkpoint: str, source, opts: B.BuildOptions, ro: RayOptions,
                encoder_cls: type, adding: bool = False) -> B.BuildResult:
    from tqdm import tqdm

    t0 = time.perf_counter()
    src = Path(source).resolve()
    sha = manifest.model.state_sha256
    local_cpus = ro.num_cpus or int(math.ceil(ro.workers * ro.cpus_per_worker + 1))
    with ray_session(ro.address, local_cpus) as ray:
        items, nodata = _list_items(ray, src, B.manifest_tiling(manifest, adding), opts, ro)
        if not items:
            raise RsitrError(B.no_items_message(source, nodata))
        indexed = {it.key for it in manifest.read_items(index_dir)}
        todo = [it for it in items if it.key not in indexed]  # to be added by this build, in listing order
        planned = {it.key: manifest.count + i for i, it in enumerate(todo)}  # the ids they will get
        in_shards: set[str] = set()
        for p in _shard_files(index_dir):
            got = read_shard(p, sha, columns=["key"])
            if got is not None:
                in_shards.update(got["keys"])
        pending = [it for it in todo if it.key not in in_shards]
        shards = _shard_files(index_dir)
        first = int(shards[-1].stem.split("-")[1]) + 1 if shards else 0
        log.info("%s: %d items in %s, %d already indexed, %d in shards, %d to encode on Ray (%d workers)", index_dir, len(items), src,
                 len(items) - len(todo), len(todo) - len(pending), len(pending), ro.workers)
        encoded, enc_s = 0, 0.0
        if pending:
            encoded, enc_s = _encode_on_ray(ray, model, checkpoint, sha, pending, planned, index_dir, opts, ro, first, encoder_cls, tqdm)
    added = _merge_shards(index_dir, manifest, items, sha, [str(src)])
    return B.BuildResult(index_dir, IndexManifest.load(index_dir).count, added, encoded, len(items) - len(todo),
                         time.perf_counter() - t0, enc_s, nodata)


def _encode_on_ray(ray, model, checkpoint, sha, pending, planned, index_dir, opts, ro, first, encoder_cls, tqdm) -> tuple[int, float]:
    S = int(ro.shard_size)
    rows = [{"seq": i, "shard": first + i // S, "item": json.dumps(it.to_json())} for i, it in enumerate(pending)]
    expected: dict[int, int] = defaultdict(int)
    for r in rows:
        expected[r["shard"]] += 1
    bs = max(1, int(opts.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // bs, 4096)))
    ds = ds.map_batches(_decode_batch, fn_kwargs={"preprocess": model.preprocess, "max_pixels": pixel_limit()}, batch_size=bs, batch_format="numpy",
                        num_cpus=ro.decode_cpus)
    ds = ds.map_batches(encoder_cls, fn_constructor_kwargs={"checkpoint": str(checkpoint), "state_sha256": sha, "engine": opts.engine,
                                                            "onnx_cache": opts.onnx_cache, "device": opts.device,
                                                            "threads": max(1, int(ro.cpus_per_worker))},
                        compute=ray.data.ActorPoolStrategy(size=int(ro.workers)), batch_size=bs, batch_format="numpy",
                        num_cpus=ro.cpus_per_worker)
    got: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    encoded = 0
    bar = tqdm(total=len(rows), desc="index: encode (ray)", unit="tile", disable=not opts.progress)
    t0 = time.perf_counter()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for seq, shard, err, vec in zip(batch["seq"].tolist(), batch["shard"].tolist(), batch["error"].tolist(), batch["vector"]):
                received[shard] += 1
                if err:
                    if not opts.skip_bad:
                        raise DataError(err)
                    log.warning("skipped: %s", err)
                else:
                    got[shard].append((seq, vec))
                    encoded += 1
                if received[shard] == expected[shard]:
                    done = sorted(got.pop(shard, []), key=lambda t: t[0])
                    if done:
                        its = [pending[s] for s, _ in done]
                        write_shard(index_dir / SHARDS / f"shard-{shard:06d}.parquet", its, [planned[it.key] for it in its],
                                    np.stack([v for _, v in done]), sha)
            bar.update(len(batch["seq"]))
    except Exception as exc:
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise
    finally:
        bar.close()
    return encoded, time.perf_counter() - t0


def _user_error(exc: BaseException) -> RsitrError | None:
    """The RsitrError a Ray task/actor raised (Ray wraps it, or only quotes it in an
    ActorDiedError's message), as one line; None when ``exc`` is something else."""
    import re

    text, seen = str(exc), 0
    while exc is not None and seen < 10:
        if isinstance(exc, RsitrError):
            return RsitrError(str(exc).strip().splitlines()[-1])
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
        seen += 1
    m = re.search(r"rsitr\.utils\.errors\.(?:RsitrError|DataError|CheckpointError): ([^\n]+)", text)
    return RsitrError(m.group(1).strip()) if m else None


def _merge_shards(index_dir: Path, manifest: IndexManifest, listing: list[Item], sha: str, sources: list[str]) -> int:
    """Merge every shard into a new generation, new items in listing order (as the local build)."""
    shards = _shard_files(index_dir)
    old_items = manifest.read_items(index_dir)
    if not shards and manifest.files:
        return 0
    seen = {it.key for it in old_items}
    pos = {it.key: i for i, it in enumerate(listing)}
    new: list[tuple[tuple, Item, np.ndarray]] = []
    for p in shards:
        s = read_shard(p, sha)
        if s is None:
            continue
        for it, v in zip(s["items"], s["vectors"]):
            if it.key not in seen:
                seen.add(it.key)
                new.append(((pos.get(it.key, len(pos)), it.key), it, v))
    new.sort(key=lambda t: t[0])
    new_items = []
    for j, (_, it, _) in enumerate(new):
        it.id = len(old_items) + j
        new_items.append(it)
    embs = [manifest.read_embeddings(index_dir)]
    if new:
        embs.append(np.stack([v for _, _, v in new]).astype(np.float32))
    return B.commit_generation(index_dir, manifest, old_items, new_items, embs, [], sources, _shard_files(index_dir))


__all__ = ["EXECUTORS", "RayOptions", "TileEncoder", "add_to_index_ray", "build_index_ray", "ray_session", "read_shard", "write_shard"]
