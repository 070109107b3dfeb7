"""Vector stores behind one interface: FAISS files (the embedded default) and Milvus collections.

A store holds the L2-normalised image embeddings of an index together with each tile's WGS84
footprint, answers inner-product (cosine) top-k queries, and filters them by a WGS84 box
(:mod:`rsitr.retrieval.bbox`). Ids are the index's item ids (``0..n-1``, the rows of
``items.jsonl``); a store never invents ids.

* :class:`FaissStore` (``kind = "faiss"``): a :class:`~rsitr.retrieval.index.VectorIndex` (flat,
  ivf or hnsw) plus a ``[n, 4]`` float64 footprint array, saved as two files next to each other.
  A filtered search is *filter, then rank*: the ids whose footprint intersects the box are
  selected with numpy and only their vectors are scored, exactly (also for ivf/hnsw indexes).
* :class:`MilvusStore` (``kind = "milvus"``): one Milvus collection, ``uri`` either a local file
  ``*.db`` (Milvus Lite, embedded, one process at a time) or a server ``http://host:19530``
  (Milvus Standalone / Distributed; a token, if the server needs one, is read from
  ``$MILVUS_TOKEN``, never stored). Fields: ``id`` (INT64 primary key), ``vector``
  (FLOAT_VECTOR, metric IP), ``key``/``path``/``crs`` (VARCHAR), ``window`` (INT64 array, empty for
  whole images), ``west``/``south``/``east``/``north`` (DOUBLE), ``crosses`` and ``has_geo``
  (BOOL). Vector index ``FLAT`` (exact), ``IVF_FLAT`` or ``HNSW``. A filtered search pushes the
  box down as a scalar filter expression (:func:`milvus_expr`, equal to :func:`rsitr.retrieval.bbox.intersects`). Rows are
  written with ``upsert`` (by id), so re-writing the same ids after a crash is idempotent.

Stores are registered by kind (:func:`register_store`); the index builder, the search engine, the
server and the CLI go through the registry and name no store. A store class brings

* ``Options``: a dataclass of its options (given as ``--store-opt KEY=VALUE`` or through the
  spelled flags the store declares in ``cli_flags``, e.g. ``--milvus-uri X`` = ``--store-opt uri=X``);
* ``create_for_index`` (a new index: returns the ``spec`` its manifest records), ``check_continue``
  (a build re-run with options: the same store?), ``write_generation`` (the vectors of a new
  generation of the index) and ``open_for_index`` (reopen it from the recorded ``spec``; the
  options in ``open_options`` may override the recorded ones, e.g. another address).

:func:`open_store` reopens a store from the ``spec()`` an index manifest records.

For ``rsitr bench scale`` a store may also declare ``bench_name`` (its name in the tables; stores
without one are not benchmarked), ``available`` (its optional dependency imports: the default
stores of the benchmark are :func:`bench_store_kinds`) and ``bench_build`` / ``bench_params`` /
``bench_release`` (a standalone store of random vectors in a work folder, outside any index).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from rsitr.retrieval.bbox import BBox, footprint_array, intersects, parse_bbox
from rsitr.retrieval.index import KINDS, VectorIndex, _as_matrix, l2_normalize
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_path

log = logging.getLogger(__name__)

MILVUS_INDEX = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
MILVUS_MAX_K = 16384  # Milvus' topk limit
_BLOCK = 65536  # vectors scored per block in an exact filtered FAISS search


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of one query's candidate scores, best first, ties by smaller id."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        scores, ids = scores[part], ids[part]
    order = np.lexsort((ids, -scores))
    return scores[order], ids[order]


def _pad(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(s) for s, _ in rows), default=0)
    out_s = np.full((len(rows), width), -np.inf, np.float32)
    out_i = np.full((len(rows), width), -1, np.int64)
    for r, (s, i) in enumerate(rows):
        out_s[r, : len(s)], out_i[r, : len(i)] = s, i
    return out_s, out_i


@dataclasses.dataclass(frozen=True)
class StoreFlag:
    """A spelled CLI flag a store declares for one of its options (``--FLAG V`` = ``--store-opt KEY=V``);
    ``reopen``: also offered where an index is opened (search, serve), not only where one is built."""

    flag: str
    key: str
    help: str
    metavar: str | None = None
    reopen: bool = False


@dataclasses.dataclass
class StoreContext:
    """What a store is told about the index it serves: folder, vector size, index kind (``nlist``:
    IVF cells for the current count), the manifest's ``files`` and, lazily, the items' footprints."""

    index_dir: Path
    dim: int
    index_kind: str
    files: dict
    nlist: int | None = None
    footprints: Any = None  # callable -> [wgs84 | None per id]; for indexes written before footprints were stored
    vector_index: Any = None  # a VectorIndex over all rows already built (and tuned) by the caller: FAISS stores it as it is


@dataclasses.dataclass
class NoOptions:
    """A store without options."""


_REGISTRY: dict[str, type["VectorStore"]] = {}


def register_store(cls: type["VectorStore"]) -> type["VectorStore"]:
    """Class decorator: make ``cls`` available as ``--store cls.kind`` (replacing a class of that kind)."""
    if not getattr(cls, "kind", None) or not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        raise TypeError(f"{cls.__name__}: a store needs a 'kind' and an 'Options' dataclass")
    _REGISTRY[cls.kind] = cls
    return cls


def unregister_store(kind: str) -> None:
    """Remove store ``kind`` from the registry (for tests that register a store of their own)."""
    _REGISTRY.pop(kind, None)


def store_kinds() -> tuple[str, ...]:
    """The registered store kinds, in registration order (the first, ``faiss``, is the default)."""
    return tuple(_REGISTRY)


def store_class(kind: str) -> type["VectorStore"]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise RsitrError(f"unknown vector store {kind!r}; this rsitr knows {store_kinds()}") from None


def bench_store_kinds(*, available_only: bool = True) -> tuple[str, ...]:
    """The registered store kinds ``rsitr bench scale`` can measure (those declaring a
    ``bench_name``), in registration order; ``available_only``: only those whose optional
    dependency imports (the benchmark's default)."""
    return tuple(k for k, c in _REGISTRY.items() if c.bench_name and (not available_only or c.available()))


def bench_titles() -> dict[str, str]:
    """``{bench_name: title}`` of the registered stores (e.g. ``{"faiss": "FAISS"}``), for report prose."""
    return {c.bench_name: c.bench_title or c.bench_name for c in _REGISTRY.values() if c.bench_name}


def store_flags() -> list[StoreFlag]:
    """Every spelled flag of every registered store (for the CLI)."""
    return [f for cls in _REGISTRY.values() for f in cls.cli_flags]


def parse_store_options(kind: str, given: dict | None, *, reopen: bool = False):
    """The ``Options`` of store ``kind`` from ``given`` (``{key: value}``, values as typed or as
    strings); keys it does not take are refused naming the stores that do. ``reopen``: only the
    store's ``open_options`` may be given (overrides of what the manifest records)."""
    cls = store_class(kind)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    allowed = set(cls.open_options) if reopen else set(fields)
    bad = sorted(set(given) - allowed)
    if bad:
        flags = {f.key: f.flag for f in cls.cli_flags}
        others = sorted({k for k, c in _REGISTRY.items() if c is not cls and set(bad) <= {f.name for f in dataclasses.fields(c.Options)}})
        named = " / ".join(flags.get(b) or next((f.flag for f in store_flags() if f.key == b), f"--store-opt {b}") for b in bad)
        where = f"apply to --store {' or '.join(others)}, not" if others else "are not options of"
        raise RsitrError(f"{named} {where} --store {kind} (it takes: {', '.join(sorted(allowed)) or 'no options'})")
    vals = {}
    for k, v in given.items():
        typ = fields[k].type if isinstance(fields[k].type, str) else getattr(fields[k].type, "__name__", "")
        if isinstance(v, str) and typ.split("|")[0].strip() == "int":
            try:
                v = int(v)
            except ValueError:
                raise RsitrError(f"--store-opt {k}={v}: an integer is expected") from None
        vals[k] = v
    return cls.Options(**vals)


def parse_store_opt_args(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the ``--store-opt`` flag) as a dict; a pair without ``=`` is refused."""
    out: dict[str, str] = {}
    for p in pairs or ():
        key, sep, value = str(p).partition("=")
        if not sep or not key.strip():
            raise RsitrError(f"--store-opt {p!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


class VectorStore(abc.ABC):
    """Embeddings + footprints of an index. ``search(q, k, bbox)`` returns ``(scores float32 [b,
    m], ids int64 [b, m])`` best first, ``m <= k``; slots a query could not fill hold id -1 and
    score -inf. Used by :class:`rsitr.search.engine.SearchEngine` and the FTF recall stage (the
    two-argument ``search(q, k)`` is :class:`VectorIndex`'s)."""

    kind: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    open_options: ClassVar[frozenset[str]] = frozenset()  # options a reopen may override
    cli_flags: ClassVar[tuple[StoreFlag, ...]] = ()
    bench_name: ClassVar[str | None] = None  # its name in `rsitr bench scale` tables (None: not benchmarked)
    bench_title: ClassVar[str | None] = None  # its name in the benchmark's prose (default: bench_name)
    dim: int
    index_kind: str

    @classmethod
    def available(cls) -> bool:
        """Whether the store's optional dependencies import (so that it can be used here)."""
        return True

    # -- benchmarks (rsitr bench scale) ---------------------------------------------------------
    @classmethod
    def bench_build(cls, work: Path, name: str, dim: int, index_kind: str, vectors: np.ndarray, records: Sequence[dict]) -> "VectorStore":
        """A standalone store of unit ``vectors`` (``records``: their ids and paths) with its
        files under ``work`` named after ``name``, built and ready to answer ``search`` (the
        benchmark times this call)."""
        raise NotImplementedError(f"the {cls.kind} store has no benchmark")

    def bench_params(self) -> str:
        """Its index parameters as one cell of the benchmark table."""
        return ""

    def bench_release(self) -> int:
        """Close the benchmark store, remove its files and return the bytes they took on disk."""
        raise NotImplementedError(f"the {self.kind} store has no benchmark")

    # -- the life of an index's store (the registry's interface) --------------------------------
    @classmethod
    def create_for_index(cls, index_dir: Path, dim: int, index_kind: str, options) -> dict:
        """Prepare the store of a new index; returns the ``spec`` its manifest records."""
        return {"kind": cls.kind}

    @classmethod
    def check_continue(cls, spec: dict, options, index_dir: Path) -> None:
        """A build re-run on an existing index with ``options``: refuse options naming another store."""

    @classmethod
    def check_spec(cls, spec: dict) -> str | None:
        """What is wrong with a recorded ``spec`` (None: nothing), for the manifest's validation."""
        return None

    @classmethod
    @abc.abstractmethod
    def write_generation(cls, spec: dict, ctx: StoreContext, emb: np.ndarray, records: Sequence[dict], n_old: int, gen: int) -> dict:
        """Write the vectors of generation ``gen`` (``emb``: all rows; the first ``n_old`` were in the
        previous generation) before the manifest switches to it; returns the files it added to the
        index folder (``{"vectors": name, "footprints": name}`` or fewer)."""

    @classmethod
    @abc.abstractmethod
    def open_for_index(cls, spec: dict, ctx: StoreContext, options=None) -> "VectorStore":
        """Reopen the store ``spec`` records (``options``: overrides allowed by ``open_options``)."""

    def where(self) -> str:
        """Where the vectors are, for messages."""
        return "its vector file"

    @abc.abstractmethod
    def add(self, vectors: Any, records: Sequence[dict]) -> None:
        """Write ``vectors [n, dim]`` with their ``records`` (dicts with ``id``, ``key``, ``path``,
        ``window``, ``crs``, ``wgs84``: :meth:`rsitr.search.sources.Item.to_json`)."""

    @abc.abstractmethod
    def search(self, q: Any, k: int, bbox: BBox | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        ...

    @abc.abstractmethod
    def ids_in(self, bbox: BBox | str) -> np.ndarray:
        """Sorted ids of the items whose footprint intersects ``bbox``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def spec(self) -> dict:
        """What an index manifest records to reopen this store (:func:`open_store`)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _query(self, q: Any) -> np.ndarray:
        return l2_normalize(_as_matrix(q, self.dim, f"{type(self).__name__}.search"))


# -- FAISS -----------------------------------------------------------------------------------------
@register_store
class FaissStore(VectorStore):
    """Vectors and footprints as files in the index folder (the default store)."""

    kind = "faiss"
    bench_name = "faiss"
    bench_title = "FAISS"

    def __init__(self, index: VectorIndex, footprints: np.ndarray | None = None, has_geo: np.ndarray | None = None):
        self.index = index
        self.dim, self.index_kind = index.dim, index.kind
        n = len(index)
        self._fp = np.zeros((n, 4), np.float64) if footprints is None else np.asarray(footprints, np.float64).reshape(-1, 4)
        self._geo = np.zeros(n, bool) if has_geo is None else np.asarray(has_geo, bool).reshape(-1)
        self._direct_map = False
        if len(self._fp) != n or len(self._geo) != n:
            raise RsitrError(f"FaissStore: {n} vectors but {len(self._fp)} footprints / {len(self._geo)} flags")

    @classmethod
    def create(cls, dim: int, kind: str = "flat", **index_kwargs) -> "FaissStore":
        return cls(VectorIndex(dim, kind, **index_kwargs))

    def add(self, vectors: Any, records: Sequence[dict]) -> None:
        x = _as_matrix(vectors, self.dim, "FaissStore.add")
        if len(records) != len(x):
            raise RsitrError(f"FaissStore.add: {len(x)} vectors but {len(records)} records")
        ids = [int(r["id"]) for r in records]
        if ids != list(range(len(self), len(self) + len(x))):
            raise RsitrError(f"FaissStore.add: ids must continue from {len(self)} in order (FAISS ids are insertion order)")
        fp, geo = footprint_array([r.get("wgs84") for r in records])
        self.index.add(x)
        self._fp = np.concatenate([self._fp, fp])
        self._geo = np.concatenate([self._geo, geo])

    def __len__(self) -> int:
        return len(self.index)

    def ids_in(self, bbox: BBox | str) -> np.ndarray:
        return np.flatnonzero(intersects(self._fp, self._geo, parse_bbox(bbox))).astype(np.int64)

    def search(self, q: Any, k: int, bbox: BBox | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if bbox is None:
            return self.index.search(q, k)
        qm = self._query(q) if self.index.normalize else _as_matrix(q, self.dim, "FaissStore.search")
        sel = self.ids_in(bbox)
        k = min(int(k), len(sel))
        if k <= 0:
            return np.zeros((len(qm), 0), np.float32), np.zeros((len(qm), 0), np.int64)
        best: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in range(len(qm))]
        if self.index.kind == "ivf" and not self._direct_map:
            self.index.faiss_index.make_direct_map()  # reconstruct by id
            self._direct_map = True
        for b0 in range(0, len(sel), _BLOCK):  # exact: score every selected vector, keep a running top k
            ids = sel[b0 : b0 + _BLOCK]
            vec = self.index.faiss_index.reconstruct_batch(ids)
            sc = qm @ vec.T
            for r in range(len(qm)):
                s = np.concatenate([best[r][0], sc[r].astype(np.float32)])
                i = np.concatenate([best[r][1], ids])
                best[r] = _top_k(s, i, k)
        return _pad(best)

    # persistence: the FAISS file (+ its .json parameters) and the footprints next to it
    def save(self, vectors_path: str | os.PathLike, footprints_path: str | os.PathLike) -> None:
        self.index.save(vectors_path)
        with atomic_path(footprints_path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.concatenate([self._fp, self._geo[:, None].astype(np.float64)], axis=1))

    @classmethod
    def load(cls, vectors_path: str | os.PathLike, footprints_path: str | os.PathLike | None = None,
             footprints: Sequence[Sequence[float] | None] | None = None) -> "FaissStore":
        """Open a saved store; an index written before footprints were stored passes them
        (``footprints``, one WGS84 box or None per id) instead of ``footprints_path``."""
        vi = VectorIndex.load(vectors_path)
        if footprints_path is not None:
            p = Path(footprints_path)
            try:
                arr = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise RsitrError(f"{p}: unreadable footprint array ({exc})") from exc
            if arr.ndim != 2 or arr.shape != (len(vi), 5):
                raise RsitrError(f"{p}: expected [{len(vi)}, 5] footprints, got {arr.shape}")
            return cls(vi, arr[:, :4], arr[:, 4] > 0.5)
        fp, geo = footprint_array(list(footprints) if footprints is not None else [None] * len(vi))
        return cls(vi, fp, geo)

    def spec(self) -> dict:
        return {"kind": "faiss"}

    @classmethod
    def bench_build(cls, work: Path, name: str, dim: int, index_kind: str, vectors: np.ndarray, records: Sequence[dict]) -> "FaissStore":
        vi = VectorIndex(dim, index_kind, normalize=False)
        vi.add(vectors)
        st = cls(vi)
        st._bench_file = Path(work) / f"{name}.faiss"
        return st

    def bench_params(self) -> str:
        vi = self.index
        return {"flat": "", "hnsw": f"M={vi.hnsw_m} efSearch={vi.ef_search}", "ivf": f"nlist={vi.nlist}"}[vi.kind]

    def bench_release(self) -> int:
        """Saves the FAISS file (its size is the store's size on disk), then removes it and its
        parameter sidecar."""
        p = self._bench_file
        self.index.save(p)
        size = p.stat().st_size
        p.unlink()
        p.with_name(p.name + ".json").unlink(missing_ok=True)
        return size

    @classmethod
    def write_generation(cls, spec: dict, ctx: StoreContext, emb: np.ndarray, records: Sequence[dict], n_old: int, gen: int) -> dict:
        if not len(emb):
            return {}
        vi = ctx.vector_index
        if vi is None:
            vi = VectorIndex(emb.shape[1], ctx.index_kind, nlist=ctx.nlist if ctx.index_kind == "ivf" else None)
            vi.add(emb)
        st = cls(vi, *footprint_array([r.get("wgs84") for r in records]))
        files = {"vectors": f"vectors.{gen:06d}.faiss", "footprints": f"footprints.{gen:06d}.npy"}
        st.save(ctx.index_dir / files["vectors"], ctx.index_dir / files["footprints"])
        return files

    @classmethod
    def open_for_index(cls, spec: dict, ctx: StoreContext, options=None) -> "FaissStore":
        if not ctx.files.get("vectors"):
            raise RsitrError(f"{ctx.index_dir}: the FAISS store of this index has no vectors file")
        fp = ctx.files.get("footprints")
        if fp:
            return cls.load(ctx.index_dir / ctx.files["vectors"], ctx.index_dir / fp)
        return cls.load(ctx.index_dir / ctx.files["vectors"], footprints=ctx.footprints() if ctx.footprints else None)


# -- Milvus ----------------------------------------------------------------------------------------
def _milvus():
    try:
        import pymilvus  # noqa: PLC0415 (lazy: optional dependency)
    except ImportError as exc:
        raise RsitrError("the milvus store needs pymilvus (and milvus-lite for a local .db file): pip install 'rsitr[scale]'") from exc
    return pymilvus


def normalize_uri(uri: str) -> str:
    """A Milvus Lite file (``*.db``, made absolute) or a server URL (``http(s)://``, ``tcp://``,
    ``unix:``); anything else is refused."""
    uri = str(uri).strip()
    if re.match(r"^(https?|tcp|grpc)://[^\s/]+", uri) or uri.startswith("unix:"):
        return uri
    if uri.endswith(".db"):
        return str(Path(uri).expanduser().resolve())
    raise RsitrError(f"--milvus-uri: expected a Milvus Lite file ending in .db or a server URL such as http://host:19530, got {uri!r}")


def default_collection(index_dir: str | os.PathLike) -> str:
    """``rsitr_<folder name>_<8 hex of its absolute path>``: one collection per index folder."""
    import hashlib

    p = Path(index_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9_]", "_", p.name)[:60] or "index"
    return f"rsitr_{name}_{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def milvus_expr(box: BBox) -> str:
    """The Milvus boolean expression equal to :func:`intersects` (exact float64 literals)."""
    W, S, E, N = (repr(float(v)) for v in box.as_list())
    lat = f"south <= {N} and north >= {S}"
    if box.crosses_antimeridian:
        lon = f"(crosses == true or east >= {W} or west <= {E})"
    else:
        lon = (f"((crosses == false and west <= {E} and east >= {W}) or "
               f"(crosses == true and (west <= {E} or east >= {W})))")
    return f"has_geo == true and {lat} and {lon}"


@dataclasses.dataclass
class MilvusOptions:
    """``--store milvus`` options: ``uri`` (a Milvus Lite file ``*.db`` or a server URL), ``collection``
    (default :func:`default_collection` of the index folder), and the vector index parameters."""

    uri: str | None = None
    collection: str | None = None
    nlist: int = 128
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128


@register_store
class MilvusStore(VectorStore):
    """One Milvus collection (Milvus Lite file or server) holding vectors and tile metadata."""

    kind = "milvus"
    bench_name = "milvus-lite"  # the benchmark measures a local Milvus Lite file
    bench_title = "Milvus Lite"
    Options = MilvusOptions
    open_options = frozenset({"uri"})
    cli_flags = (
        StoreFlag("--milvus-uri", "uri", "--store milvus: a Milvus Lite file (embedded) or a server such as http://host:19530 "
                  "(token: $MILVUS_TOKEN); on search/serve: reach the index's collection here instead of the recorded URI",
                  metavar="FILE.db|URL", reopen=True),
        StoreFlag("--milvus-collection", "collection", "--store milvus: collection name (default: rsitr_<index folder>_<hash of its path>)"),
    )
    BATCH = 2000  # rows per upsert (well under Milvus' 64 MB message limit at dim 1024)

    def __init__(self, uri: str, collection: str, dim: int, index_kind: str = "flat", *, nlist: int = 128, nprobe: int = 16,
                 hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128):
        if index_kind not in KINDS:
            raise RsitrError(f"unknown index kind {index_kind!r}; choose one of {KINDS}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", collection or ""):
            raise RsitrError(f"--milvus-collection: {collection!r} is not a valid Milvus collection name (letters, digits, _)")
        self.uri, self.collection, self.dim, self.index_kind = normalize_uri(uri), collection, int(dim), index_kind
        self.nlist, self.nprobe, self.hnsw_m, self.ef_construction, self.ef_search = int(nlist), int(nprobe), int(hnsw_m), int(ef_construction), int(ef_search)
        self._client = None
        self._loaded = False

    # -- connection ----------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            pm = _milvus()
            token = os.environ.get("MILVUS_TOKEN", "")
            try:
                self._client = pm.MilvusClient(self.uri, token=token) if token else pm.MilvusClient(self.uri)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one cause
                hint = (" (a Milvus Lite file is opened by one process at a time: is `rsitr serve` or another build using it?)"
                        if self.uri.endswith(".db") else "")
                raise RsitrError(f"cannot open Milvus at {self.uri}: {exc}{hint}") from exc
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
                self._loaded = False

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    def create(self) -> None:
        """Create the collection and its vector index; refuses an existing collection."""
        pm = _milvus()
        c = self.client
        if c.has_collection(self.collection):
            raise RsitrError(f"Milvus collection {self.collection!r} already exists at {self.uri}; choose another "
                             f"--milvus-collection or drop it")
        DT = pm.DataType
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DT.INT64, is_primary=True)
        s.add_field("vector", DT.FLOAT_VECTOR, dim=self.dim)
        s.add_field("key", DT.VARCHAR, max_length=8192)
        s.add_field("path", DT.VARCHAR, max_length=4096)
        s.add_field("crs", DT.VARCHAR, max_length=8192)
        s.add_field("window", DT.ARRAY, element_type=DT.INT64, max_capacity=4)
        for f in ("west", "south", "east", "north"):
            s.add_field(f, DT.DOUBLE)
        s.add_field("crosses", DT.BOOL)
        s.add_field("has_geo", DT.BOOL)
        ip = c.prepare_index_params()
        params = {"flat": {}, "ivf": {"nlist": self.nlist}, "hnsw": {"M": self.hnsw_m, "efConstruction": self.ef_construction}}[self.index_kind]
        ip.add_index(field_name="vector", index_type=MILVUS_INDEX[self.index_kind], metric_type="IP", params=params)
        c.create_collection(self.collection, schema=s, consistency_level="Strong")
        # the index separately: a synchronous create_index waits through AllocTimestamp, which Milvus Lite
        # (3.x) does not implement (its gRPC server logs an ERROR with a traceback); a server builds the
        # index in the background either way and answers searches meanwhile
        c.create_index(self.collection, ip, sync=not self.uri.endswith(".db"))
        self._ensure_loaded()
        log.info("created Milvus collection %s at %s (%s, IP)", self.collection, self.uri, MILVUS_INDEX[self.index_kind])

    def _need(self) -> None:
        if not self.client.has_collection(self.collection):
            raise RsitrError(f"Milvus collection {self.collection!r} not found at {self.uri} (was the index built against "
                             f"another Milvus? rebuild it, or pass the right --milvus-uri)")
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        """Load the collection into memory once per connection. A collection with a vector index is
        *released* when a new process (or a restarted server) opens it, and Milvus refuses searches
        and queries on a released collection; loading a loaded one is a no-op."""
        if self._loaded:
            return
        try:
            state = self.client.get_load_state(self.collection)
            loaded = "Loaded" in str(state.get("state", "")) if isinstance(state, dict) else False
            if not loaded:
                self.client.load_collection(self.collection)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one cause
            raise RsitrError(f"cannot load Milvus collection {self.collection!r} at {self.uri}: {exc}") from exc
        self._loaded = True

    # -- data ----------------------------------------------------------------------------------
    def add(self, vectors: Any, records: Sequence[dict]) -> None:
        x = l2_normalize(_as_matrix(vectors, self.dim, "MilvusStore.add"))
        if len(records) != len(x):
            raise RsitrError(f"MilvusStore.add: {len(x)} vectors but {len(records)} records")
        self._need()
        fp, geo = footprint_array([r.get("wgs84") for r in records])
        rows = []
        for i, r in enumerate(records):
            win = r.get("window")
            rows.append({"id": int(r["id"]), "vector": x[i].tolist(), "key": str(r.get("key") or r["path"]), "path": str(r["path"]),
                         "crs": str(r.get("crs") or ""), "window": [int(v) for v in win] if win else [],
                         "west": float(fp[i, 0]), "south": float(fp[i, 1]), "east": float(fp[i, 2]), "north": float(fp[i, 3]),
                         "crosses": bool(geo[i] and fp[i, 0] > fp[i, 2]), "has_geo": bool(geo[i])})
            if len(rows) == self.BATCH:
                self.client.upsert(self.collection, rows)
                rows = []
        if rows:
            self.client.upsert(self.collection, rows)

    def delete_from(self, first_id: int) -> None:
        """Remove every row with ``id >= first_id`` (the leftovers of an interrupted write)."""
        self._need()
        self.client.delete(self.collection, filter=f"id >= {int(first_id)}")

    def __len__(self) -> int:
        self._need()
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def _search_params(self) -> dict:
        p = {"flat": {}, "ivf": {"nprobe": self.nprobe}, "hnsw": {"ef": self.ef_search}}[self.index_kind]
        return {"metric_type": "IP", "params": p}

    def search(self, q: Any, k: int, bbox: BBox | str | None = None, *, output_fields: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        qm = self._query(q)
        k = int(k)
        if k > MILVUS_MAX_K:
            raise RsitrError(f"k={k}: Milvus returns at most {MILVUS_MAX_K} hits per query")
        if k <= 0 or len(qm) == 0:
            return np.zeros((len(qm), 0), np.float32), np.zeros((len(qm), 0), np.int64)
        self._need()
        expr = milvus_expr(parse_bbox(bbox)) if bbox is not None else ""
        res = self.client.search(self.collection, data=[v.tolist() for v in qm], limit=k, filter=expr,
                                 output_fields=list(output_fields), search_params=self._search_params())
        rows = []
        for hits in res:
            s = np.array([h["distance"] for h in hits], np.float32)
            i = np.array([h["id"] for h in hits], np.int64)
            rows.append((s, i) if len(s) else (np.zeros(0, np.float32), np.zeros(0, np.int64)))
        return _pad(rows)

    def ids_in(self, bbox: BBox | str) -> np.ndarray:
        self._need()
        expr = milvus_expr(parse_bbox(bbox))
        out: list[int] = []
        it = self.client.query_iterator(self.collection, batch_size=10000, filter=expr, output_fields=["id"])
        try:
            while True:
                batch = it.next()
                if not batch:
                    break
                out.extend(int(r["id"]) for r in batch)
        finally:
            it.close()
        return np.array(sorted(out), np.int64)

    def records(self, ids: Sequence[int]) -> list[dict]:
        """Stored metadata of ``ids`` (for checks and tools; the search engine uses its item table)."""
        self._need()
        if not len(ids):
            return []
        rows = self.client.query(self.collection, filter=f"id in {[int(i) for i in ids]}",
                                 output_fields=["id", "key", "path", "crs", "window", "west", "south", "east", "north", "has_geo"])
        by = {int(r["id"]): r for r in rows}
        return [by[int(i)] for i in ids if int(i) in by]

    def spec(self) -> dict:
        return {"kind": "milvus", "uri": self.uri, "collection": self.collection, "index": MILVUS_INDEX[self.index_kind],
                "metric": "IP", "nlist": self.nlist, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m,
                "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    def where(self) -> str:
        return f"Milvus collection {self.collection} at {self.uri}"

    @classmethod
    def available(cls) -> bool:
        """pymilvus and milvus-lite (the benchmark and a ``*.db`` URI use Milvus Lite) import."""
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))

    @classmethod
    def bench_build(cls, work: Path, name: str, dim: int, index_kind: str, vectors: np.ndarray, records: Sequence[dict]) -> "MilvusStore":
        """A Milvus Lite file ``work/NAME.db``: created, filled in blocks of 50,000, flushed, and
        searched once (the first search waits for the vector index)."""
        st = cls(str(Path(work) / f"{name}.db"), f"bench_{index_kind}", dim, index_kind)
        try:
            st.create()
            for b0 in range(0, len(vectors), 50_000):
                st.add(vectors[b0 : b0 + 50_000], records[b0 : b0 + 50_000])
            st.client.flush(st.collection)
            st.search(vectors[:1], 1)
        except BaseException:
            st.close()
            raise
        return st

    def bench_params(self) -> str:
        return {"flat": "FLAT", "hnsw": f"HNSW M={self.hnsw_m} ef={self.ef_search}", "ivf": f"IVF_FLAT nlist={self.nlist}"}[self.index_kind]

    def bench_release(self) -> int:
        self.close()
        db = Path(self.uri)
        size = sum(f.stat().st_size for f in db.rglob("*") if f.is_file()) if db.is_dir() else db.stat().st_size
        if db.is_dir():
            import shutil

            shutil.rmtree(db, ignore_errors=True)
        else:
            db.unlink(missing_ok=True)
        return size

    @classmethod
    def check_spec(cls, spec: dict) -> str | None:
        if not all(isinstance(spec.get(k), str) and spec[k] for k in ("uri", "collection")):
            return "a milvus store needs 'uri' and 'collection' strings"
        return None

    @classmethod
    def create_for_index(cls, index_dir: Path, dim: int, index_kind: str, options: MilvusOptions) -> dict:
        if not options.uri:
            raise RsitrError("--store milvus needs --milvus-uri (a Milvus Lite file such as idx.db, or http://host:19530)")
        o = options
        with cls(o.uri, o.collection or default_collection(index_dir), dim, index_kind, nlist=o.nlist, nprobe=o.nprobe,
                 hnsw_m=o.hnsw_m, ef_construction=o.ef_construction, ef_search=o.ef_search) as st:
            st.create()  # refuses a collection that already exists
            return st.spec()

    @classmethod
    def check_continue(cls, spec: dict, options: MilvusOptions, index_dir: Path) -> None:
        if (options.uri and normalize_uri(options.uri) != spec["uri"]) or (options.collection and options.collection != spec["collection"]):
            raise RsitrError(f"{index_dir}: this index writes to Milvus collection {spec['collection']} at {spec['uri']}; "
                             f"it cannot continue into another one")

    @classmethod
    def write_generation(cls, spec: dict, ctx: StoreContext, emb: np.ndarray, records: Sequence[dict], n_old: int, gen: int) -> dict:
        with cls.from_spec(spec, ctx.dim, ctx.index_kind) as st:
            st.delete_from(n_old)  # rows an interrupted merge left past the committed count
            st.add(emb[n_old:], records[n_old:])
        return {}

    @classmethod
    def open_for_index(cls, spec: dict, ctx: StoreContext, options: MilvusOptions | None = None) -> "MilvusStore":
        return cls.from_spec(spec, ctx.dim, ctx.index_kind, uri=options.uri if options is not None else None)

    @classmethod
    def from_spec(cls, spec: dict, dim: int, index_kind: str, uri: str | None = None) -> "MilvusStore":
        return cls(uri or spec["uri"], spec["collection"], dim, index_kind, nlist=int(spec.get("nlist", 128)),
                   nprobe=int(spec.get("nprobe", 16)), hnsw_m=int(spec.get("hnsw_m", 32)),
                   ef_construction=int(spec.get("ef_construction", 200)), ef_search=int(spec.get("ef_search", 128)))


def open_store(spec: dict | None, ctx: StoreContext, options: dict | None = None) -> VectorStore:
    """Reopen the store an index manifest names (``spec`` None: an older index, FAISS);
    ``options``: ``{key: value}`` overrides the store allows on a reopen (``open_options``)."""
    kind = (spec or {}).get("kind", "faiss")
    cls = store_class(kind)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    foreign = sorted(k for k in options if k not in cls.open_options
                     and any(k in c.open_options for c in _REGISTRY.values() if c is not cls))
    if foreign:  # e.g. one server command line for indexes of several stores: as before, options of another store are ignored
        log.warning("%s: ignored for this index (its store is %s)", ", ".join(foreign), kind)
        options = {k: v for k, v in options.items() if k not in foreign}
    return cls.open_for_index(spec or {"kind": kind}, ctx, parse_store_options(kind, options, reopen=True) if options else None)


__all__ = ["FaissStore", "MILVUS_INDEX", "MilvusOptions", "MilvusStore", "NoOptions", "StoreContext", "StoreFlag", "VectorStore",
           "bench_store_kinds", "bench_titles", "default_collection", "milvus_expr", "normalize_uri", "open_store", "parse_store_opt_args", "parse_store_options", "register_store",
           "store_class", "store_flags", "store_kinds", "unregister_store"]
