"""Build and grow a search index over a folder of images / GeoTIFF scenes.

Index folder layout (``rsitr index build SOURCE --checkpoint M --out INDEX``)::

    INDEX/manifest.json                model identity, preprocessing, tiling, dim, count, files
    INDEX/items.<gen>.jsonl            one JSON object per item: id, key, path, window, bounds, crs, wgs84
    INDEX/embeddings.<gen>.npy         float32 [count, dim], L2-normalised (row = item id)
    INDEX/vectors.<gen>.faiss(.json)   rsitr.retrieval.index.VectorIndex over those rows (store "faiss")
    INDEX/footprints.<gen>.npy         WGS84 footprints of those rows for --bbox filters (store "faiss")
    INDEX/tokens.<gen>/                rsitr.retrieval.index.TokenStore (only with --keep-tokens)
    INDEX/chunks/chunk-NNNNNN.npz      encoded but not yet merged items (exist only mid-build)

Crash safety / resume: the manifest is written first (count 0) so the folder always names its
model. Items are encoded in chunks of ``chunk_size``; each chunk (item records + embeddings
[+ tokens]) is written atomically. When every pending item is encoded the chunks are merged into
a new *generation* of data files, and the manifest - written atomically last - switches to it;
only then are the old generation and the chunks removed. A build that is killed at any point
is continued by running the same command again: items already in the index or in a chunk are
never encoded again. ``rsitr index add INDEX SOURCE`` is the same operation on an existing index
(items whose key - path, plus window for tiles - is already indexed are skipped).

Vector store (``--store KIND``, ``--store-opt KEY=VALUE``; recorded in the manifest's ``store``):
one of the stores registered in :mod:`rsitr.retrieval.stores` (``faiss``, the default, writes the
vector index and footprints into the folder; others keep the vectors elsewhere). Either way the
folder keeps the manifest (:class:`rsitr.search.manifest.IndexManifest`), the item table and the
embeddings. A merge writes the new rows to the store (``write_generation``) *before* the manifest
switches; a store outside the folder first drops any row past the previous count, so a merge
killed half-way is simply redone.

Encoding (:func:`_encode_pending`): decode threads fill preallocated uint8 batches ahead of the
encoder (:mod:`rsitr.search.pipeline`); with ``tta`` 4 or 8 (``--tta``, recorded in the manifest as
``test_time_views`` and used again by ``index add``) each tile's vector is the mean of its
L2-normalised dihedral views, encoded in the same call (:func:`rsitr.models.tta.encode_views`,
the same code as ``rsitr eval --tta``); queries are not averaged. ``BuildResult.profile`` says
where the time went (decode, resize, wait, encode, write).

Index kind ``auto`` (``IndexManifest.index_auto``; FAISS store): every merge picks the kind for the
number of vectors - exact below 50k, else the fastest of the IVF and HNSW candidates tuned to the
target recall, exact only when none reaches it (:func:`rsitr.retrieval.autoindex.auto_index`); the
manifest records the kind, its parameters, the recall and query time measured on the index's own
vectors and every candidate tried.

Model identity: ``state_sha256`` hashes every tensor of the backbone (and of the trained method a
checkpoint carries); an index is only ever used with a model whose hash matches (else
:class:`RsitrError`). Random-init specs (``clip:tiny``..., and the untrained heads of
``towers:NAME``) are built with seed 0 so the same spec always gives the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rsitr.retrieval.index import ivf_nlist
from rsitr.search.manifest import (MANIFEST, RANDOM_INIT_SEED, IndexManifest, ModelRef, load_model, model_identity,  # noqa: F401
                                   read_manifest, state_sha256)
from rsitr.search.sources import MAX_NODATA, STRETCH, Item, Tiling, read_item, scan_source_report
from rsitr.utils.errors import DataError, RsitrError
from rsitr.utils.io import atomic_path, jsonable

log = logging.getLogger(__name__)

CHUNKS = "chunks"


def backbone_info(model) -> dict[str, Any]:
    info = model.info
    return {"kind": info.kind, "name": info.name, "config": jsonable(info.config), "weights": jsonable(info.weights),
            "embed_dim": int(model.embed_dim)}


def check_model(manifest: IndexManifest, ident: ModelRef, where: Path) -> None:
    """Refuse a model that is not the one the index was built with (:meth:`IndexManifest.check_model`)."""
    manifest.check_model(ident, where)


def read_items(index_dir: Path, manifest: IndexManifest) -> list[Item]:
    return manifest.read_items(index_dir)


def read_embeddings(index_dir: Path, manifest: IndexManifest, mmap: bool = False) -> np.ndarray:
    return manifest.read_embeddings(index_dir, mmap=mmap)


@dataclasses.dataclass
class BuildOptions:
    """What ``index build``/``add`` does. Tiling of georeferenced rasters (see :func:`resolve_tiling`):
    ``tile_meters`` (ground sizes, metres) else, with ``auto_meters``, the sizes the model's card
    gives (``ground_tiles_m``), else ``tile_size``/``overlap`` pixels; ``overlap_m``: metres shared
    by neighbouring metre tiles; ``max_nodata``: the no-data share above which a tile is skipped;
    ``black_nodata``: pure black counts as no-data in rasters that declare none."""

    tile_size: int = 256
    overlap: int = 0
    tile_meters: tuple[float, ...] | None = None
    overlap_m: float = 0.0
    auto_meters: bool = False
    max_nodata: float | None = MAX_NODATA
    black_nodata: bool = False
    batch_size: int = 32
    index_kind: str = "flat"
    keep_tokens: bool = False
    chunk_size: int | None = None  # items per resumable chunk (default 4 batches)
    skip_bad: bool = False
    device: str = "cpu"
    progress: bool = True
    engine: str = "auto"  # no-grad encoder: "auto" (ONNX Runtime where installed) | "onnx" | "torch"; same vectors within 1e-4
    onnx_cache: str | None = None  # exported graphs (default: rsitr.models.engine.default_cache_dir())
    store: str = "faiss"  # vector store kind (rsitr.retrieval.stores.store_kinds(); "faiss": files in the index folder)
    store_options: dict = dataclasses.field(default_factory=dict)  # the store's options {key: value} (its Options dataclass)
    tta: int = 1  # test-time views per tile (1, 4 or 8): embedding = mean of the L2-normalised view embeddings
    workers: int | None = None  # decode threads (default: rsitr.search.build.default_workers())
    target_recall: float = 0.95  # index_kind "auto": the recall@10 the tuned index must reach on its own vectors
    auto_flat_below: int = 50_000  # index_kind "auto": exact search below this many vectors


@dataclasses.dataclass
class BuildResult:
    index_dir: Path
    total: int  # items in the index
    added: int  # items merged by this call
    encoded: int  # items encoded by this call (resume: fewer than added)
    skipped: int  # items of SOURCE already indexed
    seconds: float
    encode_seconds: float
    skipped_nodata: int = 0  # tiles of SOURCE not indexed because they are mostly no-data
    profile: dict | None = None  # rsitr.search.pipeline.StageTimes.as_dict(): seconds and share per stage

    @property
    def tiles_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else float("nan")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


CARD_WHY = "the model's training ground resolution; --tile-meters to change, --tile-size for pixel tiles"
FLAG_WHY = "--tile-meters"
NO_CARD_WHY = "the model has no card giving the ground resolution it was trained at; --tile-meters M tiles in metres"
WHY = {"card": CARD_WHY, "flag": FLAG_WHY, "default": NO_CARD_WHY}


def card_ground_tiles(checkpoint: str) -> list[float] | None:
    """The ground tile sizes (metres) a shipped model's card says it was trained at, else None
    (any other model has no card)."""
    from rsitr.models.shipped import read_card, resolve

    found = resolve(checkpoint)
    if found is None:
        return None
    sizes = read_card(*found)["card"].get("ground_tiles_m")
    return [float(v) for v in sizes] if sizes else None


def resolve_tiling(opts: BuildOptions, checkpoint: str, model) -> tuple[Tiling, str | None]:
    """The :class:`Tiling` a new index gets, and where its sizes come from (``"flag"``: --tile-meters,
    ``"card"``: the shipped model's card, ``"default"``: pixel tiles because the model has no card,
    None: pixel tiles asked for). ``model``: the backbone (its input size is the metre tiles' read size)."""
    meters, source = opts.tile_meters, None
    if meters:
        source = "flag"
    elif opts.auto_meters:
        meters = card_ground_tiles(checkpoint)
        source = "card" if meters else "default"
    tiling = Tiling(tile_size=int(opts.tile_size), overlap=int(opts.overlap), meters=tuple(float(m) for m in meters) if meters else None,
                    overlap_m=float(opts.overlap_m) if meters else 0.0, out_px=int(model.preprocess.image_size) if meters else None,
                    max_nodata=opts.max_nodata, black_nodata=bool(opts.black_nodata), why=WHY.get(source or "", ""))
    return tiling.check(), source


def manifest_tiling(manifest: IndexManifest, adding: bool = False) -> Tiling:
    """The :class:`Tiling` an index records (``index add`` cuts new scenes the same way); indexes
    written before the no-data rule skip no tile."""
    t = manifest.tiling
    tiling = Tiling.from_manifest(t, manifest.max_nodata, manifest.black_nodata)
    tiling.why = "as the index records" if adding else WHY.get(t.get("source") or "", "")
    return tiling


def _new_manifest(model, ident: ModelRef, opts: BuildOptions, store: dict, tiling: Tiling | None = None,
                  source: str | None = None) -> IndexManifest:
    tiling = tiling or Tiling(int(opts.tile_size), int(opts.overlap), max_nodata=None)
    record = tiling.to_manifest()
    if source:
        record["source"] = source
    return IndexManifest(
        model=ident, backbone=backbone_info(model),
        preprocess={**dataclasses.asdict(model.preprocess), "transform": "rsitr.data.transforms.EvalTransform",
                    "stretch_over_8bit": STRETCH, "stretch_scope": "whole image; tiles: their scene (decimated read)",
                    "band_rule": "1 band grey, >=3 bands the ones tagged R,G,B else the first three, nodata black"},
        tile_size=int(tiling.tile_size), overlap=int(tiling.overlap), embed_dim=int(model.embed_dim), index_kind="flat" if opts.index_kind == "auto" else opts.index_kind,
        index_auto={"target_recall": float(opts.target_recall), "flat_below": int(opts.auto_flat_below)} if opts.index_kind == "auto" else None,
        test_time_views=int(opts.tta),
        tokens=bool(opts.keep_tokens), store=store, created=_now(), updated=_now(),
        tiling_extra={k: v for k, v in record.items() if k not in ("tile_size", "overlap")},
        extra={"nodata": {"max_fraction": tiling.max_nodata, **({"black": True} if tiling.black_nodata else {})}})


# -- encoding ------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batch(model, pixels: torch.Tensor, keep_tokens: bool, tta: int = 1) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(embeddings float32 [B, D] L2-normalised, tokens fp16 [B, N, D] | None, mask | None)``;
    ``model``: a backbone or its :class:`rsitr.models.engine.InferenceEngine`; ``tta`` views per
    tile, encoded in the same call (:func:`rsitr.models.tta.encode_views`; tokens: the unrotated view)."""
    from rsitr.models.tta import encode_views

    f = encode_views(model, pixels, tta, tokens=keep_tokens)
    emb = torch.nn.functional.normalize(f.pooled.float(), dim=-1).cpu().numpy()
    if keep_tokens:
        tok = torch.nn.functional.normalize(f.tokens.float(), dim=-1)  # unit vectors: safe in fp16, the interaction uses cosines
        return emb, tok.cpu().numpy().astype(np.float16), f.mask.cpu().numpy()
    return emb, None, None


def default_workers() -> int:
    """Decode threads: the machine's cores, at least 2 (one decodes while the model encodes), at most 8."""
    return max(2, min(8, os.cpu_count() or 2))


def _chunk_files(index_dir: Path) -> list[Path]:
    d = index_dir / CHUNKS
    return sorted(d.glob("chunk-*.npz")) if d.is_dir() else []


def _read_chunk(p: Path) -> dict:
    try:
        with np.load(p, allow_pickle=False) as z:
            out = {"items": json.loads(str(z["items"])), "emb": z["emb"]}
            if "tokens" in z.files:
                out["tokens"], out["mask"] = z["tokens"], z["mask"]
        return out
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        # chunks are written atomically, so this is outside damage: drop it (its items are re-encoded)
        log.warning("%s: unreadable chunk (%s); its items will be encoded again", p, exc)
        p.unlink(missing_ok=True)
        return {"items": [], "emb": None}


def _write_chunk(index_dir: Path, n: int, items: list[Item], emb: np.ndarray, tokens: list | None) -> Path:
    p = index_dir / CHUNKS / f"chunk-{n:06d}.npz"
    arrays: dict[str, Any] = {"items": np.array(json.dumps([it.to_json() for it in items])), "emb": emb.astype(np.float32)}
    if tokens is not None:
        width = max(t.shape[1] for t, _ in tokens)
        arrays["tokens"] = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t, _ in tokens])
        arrays["mask"] = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for _, m in tokens])
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return p


def _encode_pending(model, pending: list[Item], index_dir: Path, opts: BuildOptions, first_chunk: int,
                    times: "StageTimes | None" = None) -> tuple[int, float]:
    """Encode ``pending`` in chunks written to ``index_dir/chunks``; returns (encoded, seconds).
    Decoding runs ahead on ``opts.workers`` threads (:mod:`rsitr.search.pipeline`); ``times``
    collects the seconds per stage."""
    from rsitr.utils.progress import progress_bar

    from rsitr.data.transforms import EvalTransform
    from rsitr.models.engine import engine_for
    from rsitr.search.pipeline import BatchDecoder, StageTimes

    times = times if times is not None else StageTimes()
    encoder = engine_for(model, opts.engine, cache_dir=opts.onnx_cache) if pending else None
    bs = max(1, int(opts.batch_size))
    chunk = int(opts.chunk_size or bs * 4)
    encoded, secs, n_chunk = 0, 0.0, first_chunk
    bar = progress_bar(total=len(pending), desc="index: encode", unit="tile", disable=not opts.progress)
    # batches in order, each tagged with its chunk; the next batches decode while one encodes
    slices = [(c0, pending[b0 : min(b0 + bs, c0 + chunk)]) for c0 in range(0, len(pending), chunk) for b0 in range(c0, min(c0 + chunk, len(pending)), bs)]
    decoder = BatchDecoder(EvalTransform(model.preprocess), opts.workers or default_workers(), times, skip_bad=opts.skip_bad)
    ahead: list = []
    depth = 2  # batches decoding ahead of the encoder
    try:
        ahead = [decoder.submit(items) for _, items in slices[:depth]]
        done: list[Item] = []
        embs: list[np.ndarray] = []
        toks: list | None = [] if opts.keep_tokens else None
        for i, (c0, items) in enumerate(slices):
            current = ahead.pop(0)
            if i + depth < len(slices):
                ahead.append(decoder.submit(slices[i + depth][1]))
            batch, px = decoder.result(current)
            if batch:
                t0 = time.perf_counter()
                e, t, m = encode_batch(encoder, px.to(opts.device), opts.keep_tokens, opts.tta)
                dt = time.perf_counter() - t0
                secs += dt
                times.add("encode", dt)
                embs.append(e)
                if toks is not None:
                    toks.append((t, m))
                done.extend(batch)
                encoded += len(batch)
            bar.update(len(items))
            last_of_chunk = i + 1 == len(slices) or slices[i + 1][0] != c0
            if last_of_chunk and done:
                t0 = time.perf_counter()
                _write_chunk(index_dir, n_chunk, done, np.concatenate(embs), toks)
                times.add("write", time.perf_counter() - t0)
                n_chunk += 1
                done, embs, toks = [], [], ([] if opts.keep_tokens else None)
    finally:
        for p in ahead:
            decoder.cancel(p)
        decoder.close()
        bar.close()
    return encoded, secs


# -- merge ---------------------------------------------------------------------------------------
def _merge(index_dir: Path, manifest: IndexManifest, sources: Sequence[str]) -> int:
    """Merge the chunks into a new generation; returns the number of items added."""
    old_items = read_items(index_dir, manifest)
    seen = {it.key for it in old_items}
    new_items: list[Item] = []
    embs = [read_embeddings(index_dir, manifest)]
    tok_parts: list[tuple[np.ndarray, np.ndarray]] = []
    chunks = _chunk_files(index_dir)
    for p in chunks:
        c = _read_chunk(p)
        if c["emb"] is None:
            continue
        keep = []
        for i, d in enumerate(c["items"]):
            if d["key"] not in seen:
                seen.add(d["key"])
                keep.append(i)
                it = Item.from_json(d)
                it.id = len(old_items) + len(new_items)
                new_items.append(it)
        if keep:
            embs.append(c["emb"][keep])
            if manifest.tokens:
                tok_parts.append((c["tokens"][keep], c["mask"][keep]))
    if not new_items and not chunks and manifest.files:
        return 0
    added = commit_generation(index_dir, manifest, old_items, new_items, embs, tok_parts, sources, chunks)
    try:
        (index_dir / CHUNKS).rmdir()
    except OSError:
        pass
    return added


def commit_generation(index_dir: Path, manifest: IndexManifest, old_items: list[Item], new_items: list[Item], embs: list[np.ndarray],
                      tok_parts: list[tuple[np.ndarray, np.ndarray]], sources: Sequence[str], cleanup: Sequence[Path]) -> int:
    """Write a new generation (items, embeddings, store[, tokens]) of ``old_items + new_items``
    (``embs``: the old embeddings then the new rows), switch the manifest to it, then remove the
    old generation and the ``cleanup`` files (chunks / shards). Returns ``len(new_items)``."""
    gen = manifest.generation + 1
    emb = np.ascontiguousarray(np.concatenate(embs).astype(np.float32))
    files = {"items": f"items.{gen:06d}.jsonl", "embeddings": f"embeddings.{gen:06d}.npy"}
    with atomic_path(index_dir / files["items"]) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for it in old_items + new_items:
                fh.write(json.dumps(it.to_json()) + "\n")
    with atomic_path(index_dir / files["embeddings"]) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb)
    files.update(_write_store(index_dir, manifest, emb, old_items + new_items, len(old_items), gen))
    if manifest.tokens:
        from rsitr.retrieval.index import TokenStore

        files["tokens"] = f"tokens.{gen:06d}"
        old = manifest.files.get("tokens")
        parts = []
        if old:
            st = TokenStore.load(index_dir / old, mmap=False)
            parts.append((st.tokens, st.mask))
        parts += tok_parts
        if parts:
            width = max(t.shape[1] for t, _ in parts)
            toks = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t, _ in parts])
            mask = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for _, m in parts])
        else:
            toks, mask = np.zeros((0, 0, manifest.embed_dim), np.float16), np.zeros((0, 0), bool)
        TokenStore.from_arrays(toks, mask, normalize=False).save(index_dir / files["tokens"])
    old_files = dict(manifest.files)
    manifest.files, manifest.generation, manifest.count, manifest.updated = files, gen, int(len(emb)), _now()
    manifest.sources = sorted(set(manifest.sources) | {str(s) for s in sources})
    if manifest.index_kind == "ivf" and len(emb):
        manifest.nlist = ivf_nlist(len(emb))
    manifest.save(index_dir)  # the commit point
    for name in old_files.values():
        _remove(index_dir / name)
        _remove(index_dir / (name + ".json"))
    for p in cleanup:
        p.unlink(missing_ok=True)
    for d in {p.parent for p in cleanup}:
        try:
            d.rmdir()
        except OSError:
            pass
    return len(new_items)


def _write_store(index_dir: Path, manifest: IndexManifest, emb: np.ndarray, items: list[Item], n_old: int, gen: int) -> dict:
    """Write the vectors of generation ``gen`` to the index's store; returns the files it added."""
    from rsitr.retrieval.stores import StoreContext, store_class

    vi = None
    if manifest.index_auto is not None and len(emb):
        from rsitr.retrieval.autoindex import auto_index

        auto = manifest.index_auto
        vi, record = auto_index(emb, float(auto.get("target_recall", 0.95)), flat_below=int(auto.get("flat_below", 50_000)))
        # the kind, its parameters and the measured recall go out with the manifest of this generation
        manifest.index_kind = record.pop("kind")
        manifest.nlist = vi.nlist if manifest.index_kind == "ivf" else None
        auto.update(record)
        log.info("index kind auto: %s %s, recall@10 %.4f on %d jittered copies of its vectors (%s)", manifest.index_kind,
                 record["params"], record["recall@10"], record["queries"], record["why"])
    ctx = StoreContext(index_dir, manifest.embed_dim, manifest.index_kind, dict(manifest.files),
                       nlist=ivf_nlist(len(emb)) if manifest.index_kind == "ivf" else None, vector_index=vi)
    return store_class(manifest.store_kind).write_generation(manifest.store, ctx, emb, [it.to_json() for it in items], n_old, gen)


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


# -- entry points --------------------------------------------------------------------------------
def build_index(source: str | os.PathLike, checkpoint: str, out: str | os.PathLike, opts: BuildOptions | None = None, *, model=None) -> BuildResult:
    """Create (or continue an interrupted build of) the index ``out`` over ``source`` (``model``: the
    :class:`~rsitr.methods.factory.LoadedModel` of ``checkpoint`` when already loaded)."""
    opts = opts or BuildOptions()
    out, manifest, model = open_for_build(source, checkpoint, out, opts, model=model)
    return _update(out, manifest, model.backbone, source, opts)


def open_for_build(source, checkpoint: str, out: str | os.PathLike, opts: BuildOptions, *, model=None) -> tuple[Path, IndexManifest, Any]:
    """Validate the options, then create the index folder (manifest first) or check that the
    existing one was started with the same model and settings. Returns ``(out, manifest, model)``,
    ``model`` the :class:`~rsitr.methods.factory.LoadedModel`."""
    from rsitr.retrieval.index import KINDS
    from rsitr.retrieval.stores import parse_store_options, store_class, store_kinds

    from rsitr.models.tta import check_views
    from rsitr.retrieval.autoindex import check_target

    if opts.index_kind not in (*KINDS, "auto"):
        raise RsitrError(f"--index-kind must be one of {(*KINDS, 'auto')}, got {opts.index_kind!r}")
    if opts.store not in store_kinds():
        raise RsitrError(f"--store must be one of {store_kinds()}, got {opts.store!r}")
    if opts.index_kind == "auto":
        check_target(opts.target_recall)
        if opts.store != "faiss":
            raise RsitrError(f"--index-kind auto tunes a FAISS index; with --store {opts.store} choose flat, ivf or hnsw")
    try:
        check_views(opts.tta)
    except ValueError as exc:
        raise RsitrError(f"--tta: {exc}") from None
    store_opts = parse_store_options(opts.store, opts.store_options)
    out = Path(out)
    model = model if model is not None else load_model(checkpoint, opts.device)
    ident = model_identity(checkpoint, model)
    tiling, source = resolve_tiling(opts, checkpoint, model.backbone)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        check_model(manifest, ident, out)
        m = manifest
        had = manifest_tiling(m)
        other_nodata = "nodata" in m.extra and (had.max_nodata, had.black_nodata) != (tiling.max_nodata, tiling.black_nodata)  # older: not recorded
        if had.to_manifest() != tiling.to_manifest() or other_nodata or m.kind_option != opts.index_kind \
                or m.tokens != bool(opts.keep_tokens) or m.store_kind != opts.store \
                or m.test_time_views != opts.tta:
            raise RsitrError(f"{out}: an index with other settings is already here ({had.describe()}, max no-data {had.max_nodata}"
                             f"{', black as no-data' if had.black_nodata else ''}, "
                             f"kind {m.kind_option}, tokens {m.tokens}, store {m.store_kind}, tta {m.test_time_views}); use `rsitr index add` "
                             f"to grow it or choose another --out")
        store_class(m.store_kind).check_continue(m.store, store_opts, out)
        log.info("%s exists: continuing it (items already encoded are kept)", out)
    else:
        if out.exists() and any(out.iterdir()):
            raise RsitrError(f"{out}: folder exists and is not an rsitr index; choose an empty or new --out")
        spec = store_class(opts.store).create_for_index(out, int(model.backbone.embed_dim),
                                                        "flat" if opts.index_kind == "auto" else opts.index_kind, store_opts)
        manifest = _new_manifest(model.backbone, ident, opts, spec, tiling, source)
        from rsitr.utils.io import make_output_dir

        make_output_dir(out)
        manifest.save(out)
    return out, manifest, model


def add_to_index(index_dir: str | os.PathLike, source: str | os.PathLike, opts: BuildOptions | None = None, *,
                 checkpoint: str | None = None, model=None) -> BuildResult:
    """Add the items of ``source`` not yet in the index (same model, tiling and index kind)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    opts = for_manifest(opts or BuildOptions(), manifest)
    spec = checkpoint or manifest.model.checkpoint
    model = model if model is not None else load_model(spec, opts.device)
    check_model(manifest, model_identity(spec, model), index_dir)
    return _update(index_dir, manifest, model.backbone, source, opts, adding=True)


def for_manifest(opts: BuildOptions, manifest: IndexManifest) -> BuildOptions:
    """``opts`` with the settings an existing index fixes (tiling, index kind, tokens, store, test-time views)."""
    return dataclasses.replace(opts, tile_size=manifest.tile_size, overlap=manifest.overlap, index_kind=manifest.kind_option,
                               keep_tokens=manifest.tokens, store=manifest.store_kind, tta=manifest.test_time_views)


def _update(index_dir: Path, manifest: IndexManifest, model, source, opts: BuildOptions, adding: bool = False) -> BuildResult:
    t0 = time.perf_counter()
    src = Path(source).resolve()
    scan = scan_source_report(src, manifest_tiling(manifest, adding), skip_bad=opts.skip_bad)
    items = scan.items
    done = {it.key for it in read_items(index_dir, manifest)}
    chunks = _chunk_files(index_dir)
    for p in chunks:
        done.update(d["key"] for d in _read_chunk(p)["items"])
    pending = [it for it in items if it.key not in done]
    skipped = len(items) - len(pending)
    chunks = _chunk_files(index_dir)  # unreadable ones were dropped
    first = int(chunks[-1].stem.split("-")[1]) + 1 if chunks else 0
    log.info("%s: %d items in %s, %d already indexed, %d to encode", index_dir, len(items), src, skipped, len(pending))
    if not items:
        raise RsitrError(no_items_message(source, scan.skipped_nodata))
    from rsitr.search.pipeline import StageTimes

    times = StageTimes()
    encoded, enc_s = _encode_pending(model, pending, index_dir, opts, first, times)
    t1 = time.perf_counter()
    added = _merge(index_dir, manifest, [str(src)])
    times.add("write", time.perf_counter() - t1)
    r = BuildResult(index_dir, read_manifest(index_dir).count, added, encoded, skipped, time.perf_counter() - t0, enc_s,
                    skipped_nodata=scan.skipped_nodata, profile=times.as_dict())
    log.debug("%s: %d tiles in %.1fs end to end; %s", index_dir, encoded, r.seconds, times.summary())
    return r


def no_items_message(source, skipped_nodata: int) -> str:
    if skipped_nodata:
        return f"{source}: nothing to index: all {skipped_nodata} tiles are mostly no-data (see --max-nodata)"
    return f"{source}: no images found (looked for {', '.join(sorted({'.jpg', '.png', '.tif', '.tiff'}))} ...)"
