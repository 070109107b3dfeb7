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

Vector store (``--store``, recorded in ``manifest["store"]``): ``faiss`` (default) writes the
vector index and footprints into the folder; ``milvus`` writes the vectors and tile metadata into
a Milvus collection (:class:`rsitr.retrieval.stores.MilvusStore`) instead. Either way the folder
keeps the manifest, the item table and the embeddings. A merge writes the new rows to Milvus by
id (upsert) *before* the manifest switches, after deleting any row past the previous count, so a
merge killed half-way is simply redone.

Model identity: ``state_sha256`` hashes every tensor of the backbone (and of the trained method a
checkpoint carries); an index is only ever used with a model whose hash matches (else
:class:`RsitrError`). Random-init specs (``clip:tiny``..., and the untrained heads of
``towers:NAME``) are built with seed 0 so the same spec always gives the same weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rsitr.search.sources import STRETCH, Item, read_item, scan_source
from rsitr.utils.errors import DataError, RsitrError
from rsitr.utils.io import atomic_path, atomic_write_json, jsonable, read_json, sha256_file
from rsitr.utils.weights import digest_state

log = logging.getLogger(__name__)

FORMAT = "rsitr-index"
VERSION = 1
MANIFEST = "manifest.json"
CHUNKS = "chunks"
RANDOM_INIT_SEED = 0


# -- model ---------------------------------------------------------------------------------------
def load_model(spec: str, device: str = "cpu"):
    """The :class:`~rsitr.methods.factory.LoadedModel` of ``spec`` in eval mode: a training
    checkpoint with the method it was trained with (random-init ``clip:NAME`` seeded, see module doc)."""
    from rsitr.methods.factory import load

    # random-init parts (clip:NAME weights, the untrained heads of towers:NAME) are seeded, so the
    # same spec always gives the same model; the global RNG stream is left alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return load(str(spec), device=device, seed=RANDOM_INIT_SEED).eval()


def state_sha256(model) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the backbone and its method
    (``model``: a :class:`~rsitr.methods.factory.LoadedModel`)."""
    h = hashlib.sha256()
    mods = [("backbone", model.backbone)]
    if model.method is not None:
        mods.append(("method", model.method))
    for prefix, mod in mods:
        digest_state(h, mod, prefix)
    return h.hexdigest()


def model_identity(spec: str, model) -> dict[str, Any]:
    p = Path(str(spec))
    file_sha = sha256_file(p) if p.is_file() else None
    return {"checkpoint": str(spec), "checkpoint_sha256": file_sha, "state_sha256": state_sha256(model),
            "method": model.trained.get("name") if model.trained else None}


def backbone_info(model) -> dict[str, Any]:
    info = model.info
    return {"kind": info.kind, "name": info.name, "config": jsonable(info.config), "weights": jsonable(info.weights),
            "embed_dim": int(model.embed_dim)}


def check_model(manifest: dict, ident: dict, where: Path) -> None:
    """Refuse a model that is not the one the index was built with."""
    want = manifest["model"]
    if want["state_sha256"] != ident["state_sha256"]:
        raise RsitrError(
            f"{where}: this index was built with model {want['checkpoint']} "
            f"({manifest['backbone']['kind']}:{manifest['backbone']['name']}, weights sha256 {want['state_sha256'][:12]}); "
            f"the model given ({ident['checkpoint']}, weights sha256 {ident['state_sha256'][:12]}) is a different model - "
            f"its embeddings are not comparable. Use the index's own model or build a new index.")


# -- manifest / files ----------------------------------------------------------------------------
def read_manifest(index_dir: str | os.PathLike) -> dict:
    d = Path(index_dir)
    p = d / MANIFEST
    if not p.is_file():
        raise RsitrError(f"{d}: not an rsitr index (no {MANIFEST}); create one with `rsitr index build`")
    m = read_json(p, "manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        got = (m.get("format"), m.get("version")) if isinstance(m, dict) else (type(m).__name__, None)
        raise RsitrError(f"{p}: not an rsitr index manifest of version {VERSION} (format {got[0]}, version {got[1]})")
    _check_manifest(m, p)
    return m


_FILE_KEYS = ("items", "embeddings", "vectors", "tokens", "footprints")


def _check_manifest(m: dict, p: Path) -> None:
    """The fields the index code reads, with their types; ``files`` may only name plain file names
    inside the index folder (a manifest is input: it must not point the server elsewhere)."""
    def bad(what: str) -> RsitrError:
        return RsitrError(f"{p}: damaged index manifest: {what}; rebuild the index")

    def is_int(v, lo=0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key, typ in (("model", dict), ("tiling", dict), ("index", dict), ("files", dict)):
        if not isinstance(m.get(key), typ):
            raise bad(f"'{key}' is missing or not an object")
    if not is_int(m.get("count")) or not is_int(m.get("embed_dim"), 1) or not is_int(m.get("generation", 0)):
        raise bad("'count', 'embed_dim' and 'generation' must be non-negative integers (embed_dim > 0)")
    if not isinstance(m.get("tokens"), bool):
        raise bad("'tokens' must be true or false")
    if not isinstance(m["model"].get("checkpoint"), str) or not m["model"]["checkpoint"]:
        raise bad("'model.checkpoint' is missing")
    if m["index"].get("kind") not in ("flat", "ivf", "hnsw"):
        raise bad(f"'index.kind' is {m['index'].get('kind')!r}, not flat/ivf/hnsw")
    if m["index"].get("nlist") is not None and not is_int(m["index"]["nlist"], 1):
        raise bad("'index.nlist' must be a positive integer")
    t = m["tiling"]
    if not is_int(t.get("tile_size"), 1) or not is_int(t.get("overlap")) or t["overlap"] >= t["tile_size"]:
        raise bad("'tiling' needs tile_size > overlap >= 0 (integers)")
    for key, name in m["files"].items():
        if key not in _FILE_KEYS or not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name:
            raise bad(f"'files.{key}' = {name!r} is not a file name of this index")
    if m["files"] and not {"items", "embeddings"} <= set(m["files"]):
        raise bad("'files' lacks items/embeddings")
    if not isinstance(m.get("sources", []), list):
        raise bad("'sources' must be a list")
    store = m.get("store")
    if store is not None and (not isinstance(store, dict) or store.get("kind") not in ("faiss", "milvus")
                              or (store["kind"] == "milvus" and not all(isinstance(store.get(k), str) and store[k] for k in ("uri", "collection")))):
        raise bad("'store' must be an object with kind faiss or milvus (uri and collection strings)")


def read_items(index_dir: Path, manifest: dict) -> list[Item]:
    name = manifest["files"].get("items")
    if not name:
        return []
    items = []
    with open(index_dir / name, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                items.append(Item.from_json(json.loads(line)))
    return items


def read_embeddings(index_dir: Path, manifest: dict, mmap: bool = False) -> np.ndarray:
    name = manifest["files"].get("embeddings")
    if not name:
        return np.zeros((0, int(manifest["embed_dim"])), np.float32)
    return np.load(index_dir / name, mmap_mode="r" if mmap else None, allow_pickle=False)


@dataclasses.dataclass
class BuildOptions:
    tile_size: int = 256
    overlap: int = 0
    batch_size: int = 32
    index_kind: str = "flat"
    keep_tokens: bool = False
    chunk_size: int | None = None  # items per resumable chunk (default 4 batches)
    skip_bad: bool = False
    device: str = "cpu"
    progress: bool = True
    engine: str = "auto"  # no-grad encoder: "auto" (ONNX Runtime where installed) | "onnx" | "torch"; same vectors within 1e-4
    onnx_cache: str | None = None  # exported graphs (default: rsitr.models.engine.default_cache_dir())
    store: str = "faiss"  # vector store: "faiss" (files in the index folder) | "milvus" (a Milvus collection)
    milvus_uri: str | None = None  # store "milvus": a Milvus Lite file *.db or a server URL http://host:19530
    milvus_collection: str | None = None  # default: rsitr.retrieval.stores.default_collection(index folder)


@dataclasses.dataclass
class BuildResult:
    index_dir: Path
    total: int  # items in the index
    added: int  # items merged by this call
    encoded: int  # items encoded by this call (resume: fewer than added)
    skipped: int  # items of SOURCE already indexed
    seconds: float
    encode_seconds: float

    @property
    def tiles_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else float("nan")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_manifest(model, ident: dict, opts: BuildOptions) -> dict:
    return {
        "format": FORMAT, "version": VERSION,
        "model": ident,
        "backbone": backbone_info(model),
        "preprocess": {**dataclasses.asdict(model.preprocess), "transform": "rsitr.data.transforms.EvalTransform",
                       "stretch_over_8bit": STRETCH, "band_rule": "1 band grey, >3 bands first three, nodata black"},
        "tiling": {"tile_size": int(opts.tile_size), "overlap": int(opts.overlap)},
        "embed_dim": int(model.embed_dim),
        "index": {"kind": opts.index_kind},
        "tokens": bool(opts.keep_tokens),
        "store": {"kind": "faiss"},
        "count": 0, "generation": 0, "created": _now(), "updated": _now(),
        "sources": [], "files": {},
    }


# -- encoding ------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batch(model, pixels: torch.Tensor, keep_tokens: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(embeddings float32 [B, D] L2-normalised, tokens fp16 [B, N, D] | None, mask | None)``;
    ``model``: a backbone or its :class:`rsitr.models.engine.InferenceEngine`."""
    if keep_tokens:
        f = model.image_features(pixels)
        emb = torch.nn.functional.normalize(f.pooled.float(), dim=-1).cpu().numpy()
        tok = torch.nn.functional.normalize(f.tokens.float(), dim=-1)  # unit vectors: safe in fp16, the interaction uses cosines
        return emb, tok.cpu().numpy().astype(np.float16), f.mask.cpu().numpy()
    emb = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1).cpu().numpy()
    return emb, None, None


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


def _encode_pending(model, pending: list[Item], index_dir: Path, opts: BuildOptions, first_chunk: int) -> tuple[int, float]:
    """Encode ``pending`` in chunks written to ``index_dir/chunks``; returns (encoded, seconds)."""
    from rsitr.utils.progress import progress_bar

    from rsitr.data.transforms import EvalTransform
    from rsitr.models.engine import engine_for

    transform = EvalTransform(model.preprocess)
    encoder = engine_for(model, opts.engine, cache_dir=opts.onnx_cache) if pending else None
    bs = max(1, int(opts.batch_size))
    chunk = int(opts.chunk_size or bs * 4)
    encoded, secs, n_chunk = 0, 0.0, first_chunk
    bar = progress_bar(total=len(pending), desc="index: encode", unit="tile", disable=not opts.progress)

    def load(items: list[Item]) -> tuple[list[Item], torch.Tensor | None]:
        """Decode, tile and transform one batch (in a thread, overlapping the previous encode)."""
        batch, px = [], []
        for it in items:
            try:
                px.append(transform(read_item(it)))
                batch.append(it)
            except DataError as exc:
                if not opts.skip_bad:
                    raise
                log.warning("skipped: %s", exc)
        return batch, (torch.stack(px) if px else None)

    # batches in order, each tagged with its chunk; the next batch is decoded while one encodes
    slices = [(c0, pending[b0 : min(b0 + bs, c0 + chunk)]) for c0 in range(0, len(pending), chunk) for b0 in range(c0, min(c0 + chunk, len(pending)), bs)]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsitr-decode")
    try:
        ahead = pool.submit(load, slices[0][1]) if slices else None
        done: list[Item] = []
        embs: list[np.ndarray] = []
        toks: list | None = [] if opts.keep_tokens else None
        for i, (c0, items) in enumerate(slices):
            batch, px = ahead.result()
            ahead = pool.submit(load, slices[i + 1][1]) if i + 1 < len(slices) else None
            if batch:
                t0 = time.perf_counter()
                e, t, m = encode_batch(encoder, px.to(opts.device), opts.keep_tokens)
                secs += time.perf_counter() - t0
                embs.append(e)
                if toks is not None:
                    toks.append((t, m))
                done.extend(batch)
                encoded += len(batch)
            bar.update(len(items))
            last_of_chunk = i + 1 == len(slices) or slices[i + 1][0] != c0
            if last_of_chunk and done:
                _write_chunk(index_dir, n_chunk, done, np.concatenate(embs), toks)
                n_chunk += 1
                done, embs, toks = [], [], ([] if opts.keep_tokens else None)
    finally:
        if ahead is not None:
            ahead.cancel()
        pool.shutdown(wait=True)
        bar.close()
    return encoded, secs


# -- merge ---------------------------------------------------------------------------------------
def _nlist_for(n: int) -> int:
    """IVF cells: 4 sqrt(n) (the usual rule), but at least 39 training points per cell (FAISS's
    k-means minimum) - so a small archive gets few cells (1 cell = exact search)."""
    return max(1, min(int(round(4 * math.sqrt(max(n, 1)))), n // 39))


def build_vector_index(emb: np.ndarray, kind: str):
    from rsitr.retrieval.index import VectorIndex

    vi = VectorIndex(emb.shape[1], kind, nlist=_nlist_for(len(emb)) if kind == "ivf" else None)
    if len(emb):
        vi.add(emb)
    return vi


def _merge(index_dir: Path, manifest: dict, sources: Sequence[str]) -> int:
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
            if manifest["tokens"]:
                tok_parts.append((c["tokens"][keep], c["mask"][keep]))
    if not new_items and not chunks and manifest["files"]:
        return 0
    added = commit_generation(index_dir, manifest, old_items, new_items, embs, tok_parts, sources, chunks)
    try:
        (index_dir / CHUNKS).rmdir()
    except OSError:
        pass
    return added


def commit_generation(index_dir: Path, manifest: dict, old_items: list[Item], new_items: list[Item], embs: list[np.ndarray],
                      tok_parts: list[tuple[np.ndarray, np.ndarray]], sources: Sequence[str], cleanup: Sequence[Path]) -> int:
    """Write a new generation (items, embeddings, store[, tokens]) of ``old_items + new_items``
    (``embs``: the old embeddings then the new rows), switch the manifest to it, then remove the
    old generation and the ``cleanup`` files (chunks / shards). Returns ``len(new_items)``."""
    gen = int(manifest.get("generation", 0)) + 1
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
    if manifest["tokens"]:
        from rsitr.retrieval.index import TokenStore

        files["tokens"] = f"tokens.{gen:06d}"
        old = manifest["files"].get("tokens")
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
            toks, mask = np.zeros((0, 0, int(manifest["embed_dim"])), np.float16), np.zeros((0, 0), bool)
        TokenStore.from_arrays(toks, mask, normalize=False).save(index_dir / files["tokens"])
    old_files = dict(manifest["files"])
    manifest.update(files=files, generation=gen, count=int(len(emb)), updated=_now(),
                    sources=sorted(set(manifest.get("sources", [])) | {str(s) for s in sources}))
    if manifest["index"]["kind"] == "ivf" and len(emb):
        manifest["index"]["nlist"] = _nlist_for(len(emb))
    atomic_write_json(index_dir / MANIFEST, manifest)  # the commit point
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


def store_spec(manifest: dict) -> dict:
    return manifest.get("store") or {"kind": "faiss"}  # indexes written before stores existed: FAISS


def milvus_store(manifest: dict, uri: str | None = None):
    from rsitr.retrieval.stores import MilvusStore

    return MilvusStore.from_spec(store_spec(manifest), int(manifest["embed_dim"]), manifest["index"]["kind"], uri=uri)


def _write_store(index_dir: Path, manifest: dict, emb: np.ndarray, items: list[Item], n_old: int, gen: int) -> dict:
    """Write the vectors of generation ``gen`` to the index's store; returns the files it added."""
    if store_spec(manifest)["kind"] == "milvus":
        with milvus_store(manifest) as st:
            st.delete_from(n_old)  # rows an interrupted merge left past the committed count
            st.add(emb[n_old:], [it.to_json() for it in items[n_old:]])
        return {}
    if not len(emb):
        return {}
    from rsitr.retrieval.bbox import footprint_array
    from rsitr.retrieval.stores import FaissStore

    st = FaissStore(build_vector_index(emb, manifest["index"]["kind"]), *footprint_array([it.wgs84 for it in items]))
    files = {"vectors": f"vectors.{gen:06d}.faiss", "footprints": f"footprints.{gen:06d}.npy"}
    st.save(index_dir / files["vectors"], index_dir / files["footprints"])
    return files


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


def open_for_build(source, checkpoint: str, out: str | os.PathLike, opts: BuildOptions, *, model=None) -> tuple[Path, dict, Any]:
    """Validate the options, then create the index folder (manifest first) or check that the
    existing one was started with the same model and settings. Returns ``(out, manifest, model)``,
    ``model`` the :class:`~rsitr.methods.factory.LoadedModel`."""
    from rsitr.retrieval.index import KINDS
    from rsitr.retrieval.stores import STORES

    if opts.index_kind not in KINDS:
        raise RsitrError(f"--index-kind must be one of {KINDS}, got {opts.index_kind!r}")
    if opts.store not in STORES:
        raise RsitrError(f"--store must be one of {STORES}, got {opts.store!r}")
    if opts.store == "milvus" and not opts.milvus_uri:
        raise RsitrError("--store milvus needs --milvus-uri (a Milvus Lite file such as idx.db, or http://host:19530)")
    if opts.store != "milvus" and (opts.milvus_uri or opts.milvus_collection):
        raise RsitrError("--milvus-uri / --milvus-collection apply to --store milvus only")
    out = Path(out)
    model = model if model is not None else load_model(checkpoint, opts.device)
    ident = model_identity(checkpoint, model)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        check_model(manifest, ident, out)
        t = manifest["tiling"]
        st = store_spec(manifest)
        if (t["tile_size"], t["overlap"]) != (opts.tile_size, opts.overlap) or manifest["index"]["kind"] != opts.index_kind \
                or manifest["tokens"] != bool(opts.keep_tokens) or st["kind"] != opts.store:
            raise RsitrError(f"{out}: an index with other settings is already here (tile {t['tile_size']}, overlap {t['overlap']}, "
                             f"kind {manifest['index']['kind']}, tokens {manifest['tokens']}, store {st['kind']}); use `rsitr index add` "
                             f"to grow it or choose another --out")
        if st["kind"] == "milvus" and (opts.milvus_uri or opts.milvus_collection):
            from rsitr.retrieval.stores import normalize_uri

            if (opts.milvus_uri and normalize_uri(opts.milvus_uri) != st["uri"]) or \
                    (opts.milvus_collection and opts.milvus_collection != st["collection"]):
                raise RsitrError(f"{out}: this index writes to Milvus collection {st['collection']} at {st['uri']}; "
                                 f"it cannot continue into another one")
        log.info("%s exists: continuing it (items already encoded are kept)", out)
    else:
        if out.exists() and any(out.iterdir()):
            raise RsitrError(f"{out}: folder exists and is not an rsitr index; choose an empty or new --out")
        manifest = _new_manifest(model.backbone, ident, opts)
        if opts.store == "milvus":
            from rsitr.retrieval.stores import MilvusStore, default_collection

            with MilvusStore(opts.milvus_uri, opts.milvus_collection or default_collection(out), int(model.backbone.embed_dim),
                             opts.index_kind) as st:
                st.create()  # refuses a collection that already exists
                manifest["store"] = st.spec()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MANIFEST, manifest)
    return out, manifest, model


def add_to_index(index_dir: str | os.PathLike, source: str | os.PathLike, opts: BuildOptions | None = None, *,
                 checkpoint: str | None = None, model=None) -> BuildResult:
    """Add the items of ``source`` not yet in the index (same model, tiling and index kind)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    base = opts or BuildOptions()
    opts = dataclasses.replace(base, tile_size=manifest["tiling"]["tile_size"], overlap=manifest["tiling"]["overlap"],
                               index_kind=manifest["index"]["kind"], keep_tokens=manifest["tokens"])
    spec = checkpoint or manifest["model"]["checkpoint"]
    model = model if model is not None else load_model(spec, opts.device)
    check_model(manifest, model_identity(spec, model), index_dir)
    return _update(index_dir, manifest, model.backbone, source, opts)


def _update(index_dir: Path, manifest: dict, model, source, opts: BuildOptions) -> BuildResult:
    t0 = time.perf_counter()
    src = Path(source).resolve()
    items = scan_source(src, opts.tile_size, opts.overlap, skip_bad=opts.skip_bad)
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
        raise RsitrError(f"{source}: no images found (looked for {', '.join(sorted({'.jpg', '.png', '.tif', '.tiff'}))} ...)")
    encoded, enc_s = _encode_pending(model, pending, index_dir, opts, first)
    added = _merge(index_dir, manifest, [str(src)])
    return BuildResult(index_dir, int(read_manifest(index_dir)["count"]), added, encoded, skipped, time.perf_counter() - t0, enc_s)
