"""The index manifest (``INDEX/manifest.json``): its one owner type, :class:`IndexManifest`.

Everything that reads an index folder (the builder, the Ray build, the search engine, the query
bank, the server, the CLI) goes through this module: :meth:`IndexManifest.load` validates every
field the index code relies on (a manifest is input: a damaged or hand-edited one is refused with
one line naming the file and the field), the typed attributes are what the code reads, and
:meth:`IndexManifest.read_items` / :meth:`~IndexManifest.read_embeddings` read the data files it
names, checking them against the manifest.

Schema versions (``version``):

* 1 (written up to rsitr 38a6f42): ``store`` may be absent (an index written before stores
  existed: FAISS), ``sources`` and ``generation`` may be absent. A manifest with no ``version`` at
  all is read as version 1.
* 2 (:data:`SCHEMA_VERSION`): ``store``, ``sources`` and ``generation`` always present. A version 1
  manifest is migrated on load (:func:`migrate`) and written as version 2 by the next ``index add``.
  Optional in version 2 (absent = the old behaviour): ``test_time_views`` (1, 4 or 8: the tiles'
  vectors are means over that many dihedral views; absent = 1) and ``index.auto`` (the index kind is
  chosen and tuned at every merge: the target and the last choice's parameters and measured recall).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_write_json, jsonable, read_json, sha256_file
from rsitr.utils.weights import digest_state

FORMAT = "rsitr-index"
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
FILE_KEYS = ("items", "embeddings", "vectors", "tokens", "footprints")
INDEX_KINDS = ("flat", "ivf", "hnsw")
RANDOM_INIT_SEED = 0
# what each entry of ``files`` holds, as users know the files (generations add a number to the name)
FILE_ROLES = {"items": "items.jsonl", "embeddings": "embeddings.npy", "vectors": "vectors.faiss", "footprints": "footprints.npy",
              "tokens": "tokens/"}


# -- the model an index was built with -------------------------------------------------------------
def load_model(spec: str, device: str = "cpu"):
    """The :class:`~rsitr.methods.factory.LoadedModel` of ``spec`` in eval mode: a training
    checkpoint with the method it was trained with (random-init ``clip:NAME`` parts seeded with
    :data:`RANDOM_INIT_SEED`, so the same spec always gives the same weights; the global RNG stream
    is left alone)."""
    from rsitr.methods.factory import load

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


@dataclasses.dataclass
class ModelRef:
    """The model an index was built with: the spec given, the file's sha256 (a file), the hash of
    its weights (what identity is checked by) and the method it was trained with."""

    checkpoint: str
    state_sha256: str
    checkpoint_sha256: str | None = None
    method: str | None = None

    @classmethod
    def of(cls, spec: str, model) -> "ModelRef":
        p = Path(str(spec))
        return cls(checkpoint=str(spec), state_sha256=state_sha256(model), checkpoint_sha256=sha256_file(p) if p.is_file() else None,
                   method=model.trained.get("name") if model.trained else None)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256, "state_sha256": self.state_sha256,
                "method": self.method}


def model_identity(spec: str, model) -> ModelRef:
    """:meth:`ModelRef.of` (the name the builder and the engine have always used)."""
    return ModelRef.of(spec, model)


# -- the manifest ----------------------------------------------------------------------------------
@dataclasses.dataclass
class IndexManifest:
    """An index folder's manifest (see the module doc). ``index_dir`` is where it was loaded from
    (not saved); ``extra`` keeps keys this version does not know, so a save does not drop them."""

    model: ModelRef
    backbone: dict  # kind, name, config, weights, embed_dim (as the backbone reports them)
    preprocess: dict  # the evaluation preprocessing the items were encoded with
    tile_size: int
    overlap: int
    embed_dim: int
    index_kind: str  # flat | ivf | hnsw
    tokens: bool  # a token store is kept (--keep-tokens)
    store: dict  # the vector store's spec: {"kind": ..., its own keys} (rsitr.retrieval.stores)
    count: int = 0
    generation: int = 0
    created: str = ""
    updated: str = ""
    sources: list[str] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    nlist: int | None = None  # IVF cells (index_kind ivf)
    # tiling beyond tile_size/overlap: tiles in metres (unit "m", meters, overlap_m, out_px) and
    # where the sizes came from (source: flag | card | default); rsitr.search.sources.Tiling reads it
    tiling_extra: dict = dataclasses.field(default_factory=dict)
    # --index-kind auto: {"target_recall", "flat_below", then per generation "params", "recall@10", "query_ms", "queries", "why",
    # "seconds", "candidates"} (rsitr.retrieval.autoindex.auto_index); None: the kind was given
    index_auto: dict | None = None
    test_time_views: int = 1  # dihedral views averaged per tile (--tta 1|4|8)
    extra: dict = dataclasses.field(default_factory=dict)
    index_dir: Path | None = dataclasses.field(default=None, compare=False)

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> "IndexManifest":
        """Read and validate ``index_dir/manifest.json`` (migrating older versions)."""
        d = Path(index_dir)
        p = d / MANIFEST
        if not p.is_file():
            raise RsitrError(f"{d}: not an rsitr index (no {MANIFEST}); create one with `rsitr index build`")
        m = cls.from_dict(read_json(p, "manifest"), where=p)
        m.index_dir = d
        return m

    @classmethod
    def from_dict(cls, raw: Any, *, where: str | os.PathLike = MANIFEST) -> "IndexManifest":
        """Validate ``raw`` (a parsed manifest.json) and build the typed manifest; ``where`` names
        the file in errors."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise RsitrError(f"{where}: not an rsitr index manifest (format {got!r}, expected {FORMAT!r})")
        m = migrate(copy.deepcopy(raw), where)
        _validate(m, where)
        known = {"format", "version", "model", "backbone", "preprocess", "tiling", "embed_dim", "index", "tokens", "store", "count",
                 "generation", "created", "updated", "sources", "files", "test_time_views"}
        return cls(model=ModelRef(checkpoint=m["model"]["checkpoint"], state_sha256=m["model"]["state_sha256"],
                                  checkpoint_sha256=m["model"].get("checkpoint_sha256"), method=m["model"].get("method")),
                   backbone=m["backbone"], preprocess=m.get("preprocess") or {}, tile_size=m["tiling"]["tile_size"],
                   overlap=m["tiling"]["overlap"], embed_dim=m["embed_dim"], index_kind=m["index"]["kind"], nlist=m["index"].get("nlist"),
                   index_auto=m["index"].get("auto"), test_time_views=m.get("test_time_views", 1),
                   tokens=m["tokens"], store=m["store"], count=m["count"], generation=m["generation"], created=m.get("created") or "",
                   updated=m.get("updated") or "", sources=[str(s) for s in m["sources"]], files=dict(m["files"]),
                   tiling_extra={k: v for k, v in m["tiling"].items() if k not in ("tile_size", "overlap")},
                   extra={k: v for k, v in m.items() if k not in known})

    def to_dict(self) -> dict:
        """The manifest.json content (schema :data:`SCHEMA_VERSION`)."""
        index = {"kind": self.index_kind}
        if self.nlist is not None:
            index["nlist"] = int(self.nlist)
        if self.index_auto is not None:
            index["auto"] = jsonable(self.index_auto)
        return {"format": FORMAT, "version": SCHEMA_VERSION, "model": self.model.to_dict(), "backbone": jsonable(self.backbone),
                "preprocess": jsonable(self.preprocess), "tiling": self.tiling,
                "embed_dim": int(self.embed_dim), "index": index, "tokens": bool(self.tokens), "store": dict(self.store),
                "count": int(self.count), "generation": int(self.generation), "created": self.created, "updated": self.updated,
                "sources": list(self.sources), "files": dict(self.files), "test_time_views": int(self.test_time_views), **self.extra}

    def save(self, index_dir: str | os.PathLike | None = None) -> Path:
        """Write ``manifest.json`` atomically (the commit point of a build); returns its path."""
        d = Path(index_dir) if index_dir is not None else self.index_dir
        if d is None:
            raise RsitrError("IndexManifest.save: no index folder given")
        p = d / MANIFEST
        atomic_write_json(p, self.to_dict())
        self.index_dir = d
        return p

    # -- what the index code asks ------------------------------------------------------------------
    @property
    def tiling(self) -> dict:
        """The manifest's ``tiling`` object: ``tile_size``, ``overlap`` and, for tiles in metres,
        ``unit``, ``meters``, ``overlap_m``, ``out_px`` (and ``source``)."""
        return {"tile_size": int(self.tile_size), "overlap": int(self.overlap), **jsonable(self.tiling_extra)}

    @property
    def max_nodata(self) -> float | None:
        """The no-data share above which a tile is skipped (None: an index from before the rule)."""
        return (self.extra.get("nodata") or {}).get("max_fraction")

    @property
    def black_nodata(self) -> bool:
        """Whether pure black counts as no-data in rasters that declare none (``--black-nodata``)."""
        return bool((self.extra.get("nodata") or {}).get("black", False))

    @property
    def store_kind(self) -> str:
        return str(self.store.get("kind", "faiss"))

    @property
    def kind_option(self) -> str:
        """The ``--index-kind`` the index was built with: ``auto`` when it chooses its kind itself."""
        return "auto" if self.index_auto is not None else self.index_kind

    @property
    def backbone_name(self) -> str:
        return f"{self.backbone.get('kind')}:{self.backbone.get('name')}"

    def untrained_warning(self) -> str | None:
        """One line when the model the index was built with (``model.checkpoint``) is a spec with
        untrained heads (:func:`rsitr.models.registry.untrained_spec`), naming it and what to use
        instead; None for a trained model. Said by search, serve (log, /healthz, page header)."""
        from rsitr.models.registry import UNTRAINED, untrained_spec

        spec = self.model.checkpoint
        if not untrained_spec(spec):
            return None
        return (f"index built with {spec}, {UNTRAINED}. Rebuild it with the shipped model "
                f"(`rsitr index build` without --checkpoint) or a trained run folder")

    def _dir(self, index_dir) -> Path:
        d = Path(index_dir) if index_dir is not None else self.index_dir
        if d is None:
            raise RsitrError("IndexManifest: no index folder given")
        return d

    def path(self, key: str, index_dir: str | os.PathLike | None = None) -> Path | None:
        """The file ``files[key]`` names inside the index folder (None: not written)."""
        name = self.files.get(key)
        return self._dir(index_dir) / name if name else None

    def missing(self, key_or_name: str, index_dir: str | os.PathLike | None = None) -> RsitrError:
        """The error for a data file the manifest names but the folder lacks (outside damage)."""
        key = next((k for k, v in self.files.items() if v == key_or_name or k == key_or_name), key_or_name)
        role = FILE_ROLES.get(key, key)
        return RsitrError(f"{self._dir(index_dir)}: {role} is missing ({self.files.get(key, key_or_name)}, named by {MANIFEST}); "
                          f"the index folder is damaged: rebuild the index")

    def check_files(self, index_dir: str | os.PathLike | None = None) -> None:
        """Every file the manifest names exists (else :meth:`missing`)."""
        for key in self.files:
            p = self.path(key, index_dir)
            if not p.exists():
                raise self.missing(key, index_dir)

    def check_model(self, ident: ModelRef, index_dir: str | os.PathLike | None = None) -> None:
        """Refuse a model that is not the one the index was built with."""
        if self.model.state_sha256 != ident.state_sha256:
            raise RsitrError(
                f"{self._dir(index_dir)}: this index was built with model {self.model.checkpoint} "
                f"({self.backbone_name}, weights sha256 {self.model.state_sha256[:12]}); "
                f"the model given ({ident.checkpoint}, weights sha256 {ident.state_sha256[:12]}) is a different model - "
                f"its embeddings are not comparable. Use the index's own model or build a new index.")

    def read_items(self, index_dir: str | os.PathLike | None = None) -> list:
        """The item table (:class:`~rsitr.search.sources.Item` per id); [] before the first merge."""
        from rsitr.search.sources import Item

        p = self.path("items", index_dir)
        if p is None:
            return []
        items = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        items.append(Item.from_json(json.loads(line)))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise RsitrError(f"{p}: line {n} is not an item record ({exc}); rebuild the index") from exc
        return items

    def read_embeddings(self, index_dir: str | os.PathLike | None = None, mmap: bool = False) -> np.ndarray:
        """The ``[count, embed_dim]`` float32 embeddings; vectors of another size than the manifest's
        ``embed_dim`` are refused (an edited manifest, or files of another index)."""
        p = self.path("embeddings", index_dir)
        if p is None:
            return np.zeros((0, int(self.embed_dim)), np.float32)
        try:
            emb = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as exc:
            raise RsitrError(f"{p}: unreadable embeddings ({exc}); rebuild the index") from exc
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise RsitrError(f"{self._dir(index_dir) / MANIFEST}: 'embed_dim' is {self.embed_dim} but {p.name} holds vectors of shape "
                             f"{tuple(emb.shape)}; the manifest does not describe these files: rebuild the index")
        return emb


def read_manifest(index_dir: str | os.PathLike) -> IndexManifest:
    """:meth:`IndexManifest.load`."""
    return IndexManifest.load(index_dir)


def migrate(m: dict, where: str | os.PathLike = MANIFEST) -> dict:
    """A parsed manifest of any known version as the current schema (in place; returned)."""
    version = m.get("version", 1)
    if version == 1 or "version" not in m:
        if m.get("store") is None:
            m["store"] = {"kind": "faiss"}  # indexes written before stores existed
        m.setdefault("sources", [])
        m.setdefault("generation", 0)
        m["version"] = version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise RsitrError(f"{where}: index manifest version {version!r}; this rsitr reads versions 1..{SCHEMA_VERSION} "
                         f"(a newer rsitr wrote it: upgrade rsitr, or rebuild the index)")
    return m


def _validate(m: dict, where) -> None:
    """The fields the index code reads, with their types; ``files`` may only name plain file names
    inside the index folder (a manifest is input: it must not point the server elsewhere)."""
    def bad(field: str, what: str) -> RsitrError:
        return RsitrError(f"{where}: damaged index manifest: '{field}' {what}; rebuild the index")

    def is_int(v, lo=0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for key in ("model", "backbone", "tiling", "index", "files", "store"):
        if not isinstance(m.get(key), dict):
            raise bad(key, "is missing or not an object")
    for key, lo in (("count", 0), ("embed_dim", 1), ("generation", 0)):
        if not is_int(m.get(key), lo):
            raise bad(key, f"must be an integer >= {lo}, got {m.get(key)!r}")
    if not isinstance(m.get("tokens"), bool):
        raise bad("tokens", "must be true or false")
    for key in ("checkpoint", "state_sha256"):
        if not isinstance(m["model"].get(key), str) or not m["model"][key]:
            raise bad(f"model.{key}", "is missing or not a string")
    if m["index"].get("kind") not in INDEX_KINDS:
        raise bad("index.kind", f"is {m['index'].get('kind')!r}, not one of {INDEX_KINDS}")
    if m["index"].get("nlist") is not None and not is_int(m["index"]["nlist"], 1):
        raise bad("index.nlist", "must be a positive integer")
    if m["index"].get("auto") is not None and not isinstance(m["index"]["auto"], dict):
        raise bad("index.auto", "must be an object (the record of --index-kind auto)")
    if m.get("test_time_views", 1) not in (1, 4, 8) or isinstance(m.get("test_time_views"), bool):
        raise bad("test_time_views", f"must be 1, 4 or 8, got {m.get('test_time_views')!r}")
    t = m["tiling"]
    if not is_int(t.get("tile_size"), 1):
        raise bad("tiling.tile_size", "must be an integer >= 1")
    if not is_int(t.get("overlap")) or t["overlap"] >= t["tile_size"]:
        raise bad("tiling.overlap", "must be an integer in [0, tile_size)")
    if t.get("meters") is not None:
        ms = t["meters"]
        if not isinstance(ms, list) or not ms or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in ms) \
                or not isinstance(t.get("overlap_m"), (int, float)) or not 0 <= t["overlap_m"] < min(ms) or not is_int(t.get("out_px"), 1):
            raise bad("tiling.meters", "needs positive sizes, 0 <= overlap_m < the smallest, and out_px > 0")
    nd = m.get("nodata")
    if nd is not None and (not isinstance(nd, dict) or (nd.get("max_fraction") is not None and not (
            isinstance(nd["max_fraction"], (int, float)) and not isinstance(nd["max_fraction"], bool) and 0 <= nd["max_fraction"] <= 1))):
        raise bad("nodata.max_fraction", "must be a fraction in [0, 1] or null")
    if m.get("preprocess") is not None and not isinstance(m["preprocess"], dict):
        raise bad("preprocess", "must be an object")
    for key, name in m["files"].items():
        if key not in FILE_KEYS or not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name:
            raise bad(f"files.{key}", f"= {name!r} is not a file name of this index")
    if m["files"] and not {"items", "embeddings"} <= set(m["files"]):
        raise bad("files", "lacks items/embeddings")
    if not isinstance(m["sources"], list) or not all(isinstance(s, str) for s in m["sources"]):
        raise bad("sources", "must be a list of strings")
    for key in ("created", "updated"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise bad(key, "must be a string")
    from rsitr.retrieval.stores import store_kinds

    kind = m["store"].get("kind")
    if kind not in store_kinds():
        raise bad("store.kind", f"is {kind!r}; this rsitr knows {store_kinds()}")
    from rsitr.retrieval.stores import store_class

    problem = store_class(kind).check_spec(m["store"])
    if problem:
        raise bad("store", problem)


__all__ = ["FILE_KEYS", "FORMAT", "INDEX_KINDS", "IndexManifest", "MANIFEST", "ModelRef", "RANDOM_INIT_SEED", "SCHEMA_VERSION",
           "load_model", "migrate", "model_identity", "read_manifest", "state_sha256"]
