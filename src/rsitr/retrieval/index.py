"""Vector index (FAISS) for the recall stage and a compact token store for the rerank stage.

:class:`VectorIndex` wraps ``faiss-cpu`` with inner-product search over L2-normalised float32
vectors (cosine similarity): ``kind="flat"`` (exact), ``"ivf"`` (IVF-Flat, trained on the first
``add``) or ``"hnsw"`` (HNSW-Flat). Ids are insertion order (0..len-1).

:class:`TokenStore` keeps per-image token features (the FTF rerank stage's patch tokens) as fp16
``tokens.npy [n, T, d]`` + ``mask.npy [n, T]`` in a folder, memory-mapped on load.

Both save atomically (temporary name, then rename) and round-trip exactly.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_path, atomic_write_json, read_json

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
# an IVF index's k-means runs on at most this many vectors per cell, sampled (FAISS's own cap is
# 256): its cells are as good for search (the auto index measures recall with it) at a quarter of
# the k-means time of a large archive
IVF_TRAIN_PER_CELL = 64
INDEX_FORMAT = 1


def load_faiss():
    """The faiss module (its loader's INFO chatter silenced); an error naming the package if absent."""
    from rsitr.utils.logging import quiet_library_logs

    quiet_library_logs()
    try:
        import faiss  # noqa: PLC0415 (lazy: optional dependency)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RsitrError("the vector index needs faiss: pip install faiss-cpu") from exc
    return faiss


_faiss = load_faiss


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise RsitrError(f"{what}: expected a [n, {dim}] matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise RsitrError(f"{what}: expected real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise RsitrError(f"{what}: contains NaN or infinite values")
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32; zero rows stay zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32, copy=False)


def ivf_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: 4 sqrt(n) (the usual rule), but at least 39 training points per
    cell (FAISS's k-means minimum) - so a small archive gets few cells (1 cell = exact search)."""
    return max(1, min(int(round(4 * math.sqrt(max(n, 1)))), n // 39))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class VectorIndex:
    """Inner-product index over L2-normalised float32 vectors.

    ``kind``: ``"flat"`` exact search; ``"ivf"`` IVF-Flat with ``nlist`` cells (default
    ``round(4 * sqrt(n))`` of the first ``add``, at least 1) searched with ``nprobe``; ``"hnsw"``
    HNSW-Flat with ``hnsw_m`` links per node, ``ef_construction`` (FAISS's default 40) and
    ``ef_search``. ``normalize`` (default True)
    L2-normalises vectors on ``add`` and queries on ``search``; pass False when they already are
    (then what you give is what is stored).
    """

    def __init__(self, dim: int, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 40, normalize: bool = True):
        if kind not in KINDS:
            raise RsitrError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        if int(dim) < 1:
            raise RsitrError(f"index dimension must be >= 1, got {dim}")
        self.dim, self.kind = int(dim), kind
        self.nlist = None if nlist is None else int(nlist)
        self.nprobe, self.hnsw_m, self.ef_search = int(nprobe), int(hnsw_m), int(ef_search)
        self.ef_construction = int(ef_construction)
        self.normalize = bool(normalize)
        if self.nlist is not None and self.nlist < 1:
            raise RsitrError(f"nlist must be >= 1, got {nlist}")
        self._index = None if kind == "ivf" else self._build()

    # -- construction --------------------------------------------------------------------------
    def _build(self):
        """The FAISS index of this kind (an IVF one with ``self.nlist`` cells, set by :meth:`_train`)."""
        faiss = _faiss()
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            idx = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efSearch = self.ef_search
            idx.hnsw.efConstruction = self.ef_construction
            return idx
        quantizer = faiss.IndexFlatIP(self.dim)
        idx = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        idx.nprobe = min(self.nprobe, self.nlist)
        return idx

    def params(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "dim": self.dim, "kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m, "ef_search": self.ef_search, "ef_construction": self.ef_construction, "normalize": self.normalize, "ntotal": len(self)}

    @property
    def faiss_index(self):
        return self._index

    # -- add / search ------------------------------------------------------------------------
    def add(self, x: Any) -> None:
        """Append vectors ``[n, dim]`` (ids continue from ``len(self)``). An IVF index is trained on
        its first ``add`` (k-means on a seeded sample of at most :data:`IVF_TRAIN_PER_CELL` of them
        per cell) and needs at least ``nlist`` vectors there."""
        x = _as_matrix(x, self.dim, "VectorIndex.add")
        if x.shape[0] == 0:
            return
        if self.normalize:
            x = l2_normalize(x)
        if self._index is None:  # ivf: built (and trained) on the first add
            nlist = self._nlist_for(x.shape[0])
            cap = IVF_TRAIN_PER_CELL * nlist
            self._train(x if x.shape[0] <= cap else x[np.sort(np.random.default_rng(0).choice(x.shape[0], size=cap, replace=False))],
                        nlist)
        self._index.add(x)

    def train(self, sample: Any) -> None:
        """IVF only: build the index and train its cells on ``sample`` (e.g. a subset of what will
        be added, to bound the k-means cost); the next ``add`` then only assigns. Without it the
        first ``add`` trains on everything it is given."""
        if self.kind != "ivf":
            raise RsitrError(f"only an IVF index is trained; this one is {self.kind!r}")
        if self._index is not None:
            raise RsitrError("this IVF index is already trained")
        x = _as_matrix(sample, self.dim, "VectorIndex.train")
        self._train(l2_normalize(x) if self.normalize else x)

    def _nlist_for(self, n: int) -> int:
        """IVF cells: the ``nlist`` given, else ``round(4 * sqrt(n))`` of the first add (at least 1)."""
        return self.nlist if self.nlist is not None else max(1, int(round(4 * math.sqrt(n))))

    def _train(self, x: np.ndarray, nlist: int | None = None) -> None:
        """Build the IVF index (``nlist`` cells: given, else ``self.nlist``, else 4 sqrt(len(x)))
        and run its k-means on ``x``."""
        nlist = nlist if nlist is not None else self._nlist_for(x.shape[0])
        if x.shape[0] < nlist:
            raise RsitrError(f"an IVF index with nlist={nlist} needs at least {nlist} vectors on its first add "
                             f"(got {x.shape[0]}); lower nlist or use kind='flat'")
        self.nlist = nlist
        self._index = self._build()
        self._index.train(x)

    def search(self, q: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (clipped to ``len(self)``) by inner product: ``(scores float32 [b, k], ids int64
        [b, k])``, best first. Approximate kinds may return fewer hits for a query; the missing
        slots have id -1 and score -inf."""
        q = _as_matrix(q, self.dim, "VectorIndex.search")
        if self.normalize:
            q = l2_normalize(q)
        k = min(int(k), len(self))
        if k <= 0 or q.shape[0] == 0:
            return np.zeros((q.shape[0], max(k, 0)), np.float32), np.zeros((q.shape[0], max(k, 0)), np.int64)
        scores, ids = self._index.search(q, k)
        scores = scores.astype(np.float32, copy=False)
        ids = ids.astype(np.int64, copy=False)
        scores[ids < 0] = -np.inf
        return scores, ids

    def reconstruct_all(self) -> np.ndarray:
        """The stored vectors ``[len, dim]`` (flat and hnsw; ivf via its direct map)."""
        if len(self) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "ivf":
            self._index.make_direct_map()
        return self._index.reconstruct_n(0, len(self))

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, kind={self.kind!r}, n={len(self)})"

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the FAISS index to ``path`` and its parameters to ``path + '.json'`` (atomic)."""
        faiss = _faiss()
        path = Path(path)
        if self._index is None:  # an ivf index that never saw data
            raise RsitrError(f"cannot save {path}: the IVF index is empty (untrained); add vectors first")
        with atomic_path(path) as tmp:
            faiss.write_index(self._index, str(tmp))
        atomic_write_json(_sidecar(path), self.params())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VectorIndex":
        faiss = _faiss()
        path = Path(path)
        side = _sidecar(path)
        if not path.is_file():
            raise RsitrError(f"{path}: no such index file")
        if not side.is_file():
            raise RsitrError(f"{path}: missing parameter file {side.name} next to the index")
        p = read_json(side, "index parameters")
        if p.get("format") != INDEX_FORMAT or p.get("kind") not in KINDS:
            raise RsitrError(f"{side}: unsupported index parameters (format {p.get('format')}, kind {p.get('kind')})")
        obj = cls(int(p["dim"]), p["kind"], nlist=p.get("nlist"), nprobe=int(p["nprobe"]), hnsw_m=int(p["hnsw_m"]),
                  ef_search=int(p["ef_search"]), ef_construction=int(p.get("ef_construction", 40)), normalize=bool(p.get("normalize", True)))
        try:
            idx = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise RsitrError(f"{path}: not a readable FAISS index ({exc})") from exc
        if idx.d != obj.dim or idx.ntotal != int(p.get("ntotal", idx.ntotal)):
            raise RsitrError(f"{path}: index ({idx.d} dims, {idx.ntotal} vectors) does not match {side.name} "
                             f"({obj.dim} dims, {p.get('ntotal')} vectors)")
        if obj.kind == "ivf":
            faiss.extract_index_ivf(idx).nprobe = min(obj.nprobe, int(obj.nlist or obj.nprobe))
        elif obj.kind == "hnsw":
            idx.hnsw.efSearch = obj.ef_search
        obj._index = idx
        return obj


# -- token store ---------------------------------------------------------------------------------
TOKEN_FORMAT = 1
SELECTIONS = ("norm", "pooled")


class TokenStore:
    """Per-image token features for reranking, stored compactly.

    ``tokens [n, T, d]`` float16 and ``mask [n, T]`` bool, appended in batches (``append``) and
    written as ``tokens.npy`` / ``mask.npy`` / ``meta.json`` in a folder (``save``); ``load``
    memory-maps them (``mmap_mode="r"``) so a 100k-image archive is not read into RAM.

    ``normalize`` (default True): tokens are L2-normalised before the fp16 cast - the FTF
    interaction only uses cosines, and unit vectors keep fp16 well inside its range.

    ``top_n`` (default None = keep every token): keep only ``top_n`` tokens per image, chosen by
    ``select``: ``"norm"`` (default) the tokens of largest L2 norm before normalisation (a
    text-agnostic saliency proxy needing nothing else), or ``"pooled"`` the tokens most similar
    (cosine) to the image's pooled embedding (give ``pooled`` to ``append``). Kept tokens stay in
    their original order. Padding tokens (mask False) are never kept over real ones.
    """

    def __init__(self, *, top_n: int | None = None, select: str = "norm", normalize: bool = True):
        if select not in SELECTIONS:
            raise RsitrError(f"unknown token selection {select!r}; choose one of {SELECTIONS}")
        if top_n is not None and int(top_n) < 1:
            raise RsitrError(f"top_n must be >= 1, got {top_n}")
        self.top_n = None if top_n is None else int(top_n)
        self.select, self.normalize = select, bool(normalize)
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._tokens: np.ndarray | None = None  # consolidated (or memory-mapped) arrays
        self._mask: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, mask: np.ndarray | None = None, **kwargs) -> "TokenStore":
        """A store over ready fp16 arrays (no copy when they already are fp16/bool)."""
        st = cls(**kwargs)
        tokens = np.asarray(tokens)
        if tokens.ndim != 3:
            raise RsitrError(f"tokens must be [n, T, d], got shape {tokens.shape}")
        st._tokens = tokens if tokens.dtype == np.float16 else tokens.astype(np.float16)
        st._mask = np.ones(tokens.shape[:2], bool) if mask is None else np.asarray(mask, dtype=bool)
        return st

    # -- building ----------------------------------------------------------------------------
    def append(self, tokens: Any, mask: Any = None, pooled: Any = None) -> None:
        """Add ``tokens [b, T, d]`` (torch or numpy) with ``mask [b, T]`` (default all True)."""
        t = tokens.detach().cpu().float() if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens), dtype=torch.float32)
        if t.dim() != 3:
            raise RsitrError(f"TokenStore.append: tokens must be [b, T, d], got shape {tuple(t.shape)}")
        m = torch.ones(t.shape[:2], dtype=torch.bool) if mask is None else torch.as_tensor(
            mask.detach().cpu() if isinstance(mask, torch.Tensor) else np.asarray(mask)).bool()
        if tuple(m.shape) != tuple(t.shape[:2]):
            raise RsitrError(f"TokenStore.append: mask shape {tuple(m.shape)} does not match tokens {tuple(t.shape)}")
        if self.dim is not None and t.shape[2] != self.dim:
            raise RsitrError(f"TokenStore.append: token dim {t.shape[2]} differs from the store's {self.dim}")
        if self.top_n is not None and t.shape[1] > self.top_n:
            t, m = self._select(t, m, pooled)
        if self.normalize:
            t = torch.nn.functional.normalize(t, dim=-1)
        t = t.masked_fill(~m[..., None], 0.0)
        self._parts.append((t.numpy().astype(np.float16), m.numpy()))

    def _select(self, t: torch.Tensor, m: torch.Tensor, pooled) -> tuple[torch.Tensor, torch.Tensor]:
        if self.select == "norm":
            key = t.norm(dim=-1)
        else:
            if pooled is None:
                raise RsitrError("TokenStore(select='pooled') needs the pooled embeddings in append(..., pooled=...)")
            p = torch.as_tensor(pooled.detach().cpu() if isinstance(pooled, torch.Tensor) else np.asarray(pooled)).float()
            key = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(p, dim=-1)[:, :, None]
            key = key[..., 0]
        key = key.masked_fill(~m, float("-inf"))
        idx = key.topk(self.top_n, dim=1).indices.sort(dim=1).values  # keep original token order
        t = torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[2]))
        return t, torch.gather(m, 1, idx)

    def _consolidate(self) -> None:
        if not self._parts:
            return
        parts = self._parts
        if self._tokens is not None:
            parts = [(np.asarray(self._tokens), np.asarray(self._mask))] + parts
        width = max(p[0].shape[1] for p in parts)
        toks = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t, _ in parts]
        masks = [np.pad(m, ((0, 0), (0, width - m.shape[1]))) for _, m in parts]
        self._tokens = np.concatenate(toks) if len(toks) > 1 else toks[0]
        self._mask = np.concatenate(masks) if len(masks) > 1 else masks[0]
        self._parts = []

    # -- access --------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        if self._parts:
            return int(self._parts[0][0].shape[2])
        return None if self._tokens is None else int(self._tokens.shape[2])

    @property
    def tokens(self) -> np.ndarray:
        self._consolidate()
        return self._tokens if self._tokens is not None else np.zeros((0, 0, 0), np.float16)

    @property
    def mask(self) -> np.ndarray:
        self._consolidate()
        return self._mask if self._mask is not None else np.zeros((0, 0), bool)

    def __len__(self) -> int:
        n = 0 if self._tokens is None else int(self._tokens.shape[0])
        return n + sum(int(p[0].shape[0]) for p in self._parts)

    def get(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``float32 [len(ids), T, d]`` and mask ``bool [len(ids), T]`` of the given rows
        (any shape of ids: the result has ``ids.shape + (T, d)``)."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        n = len(self)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise RsitrError(f"TokenStore.get: ids out of range 0..{n - 1}")
        toks, mask = self.tokens, self.mask
        flat = ids.reshape(-1)
        if flat.size > 1 and isinstance(toks, np.memmap):
            # read the memory map in row order (sequential pages), then restore the request order
            order = np.argsort(flat, kind="stable")
            t = np.empty((flat.size,) + toks.shape[1:], np.float16)
            t[order] = toks[flat[order]]
        else:
            t = toks[flat]
        t = torch.from_numpy(np.ascontiguousarray(t)).float().reshape(ids.shape + toks.shape[1:])
        m = torch.from_numpy(np.ascontiguousarray(mask[flat])).reshape(ids.shape + mask.shape[1:])
        return t, m

    # -- persistence -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        toks, mask = self.tokens, self.mask
        for name, arr in (("tokens.npy", toks), ("mask.npy", mask)):
            with atomic_path(folder / name) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(arr))
        atomic_write_json(folder / "meta.json", {"format": TOKEN_FORMAT, "n": int(toks.shape[0]), "tokens": int(toks.shape[1]) if toks.ndim == 3 else 0,
                                                 "dim": int(toks.shape[2]) if toks.ndim == 3 else 0, "dtype": "float16",
                                                 "top_n": self.top_n, "select": self.select, "normalize": self.normalize})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, mmap: bool = True) -> "TokenStore":
        folder = Path(folder)
        meta_p = folder / "meta.json"
        if not meta_p.is_file():
            raise RsitrError(f"{folder}: not a token store (no meta.json)")
        meta = read_json(meta_p, "token store metadata")
        if meta.get("format") != TOKEN_FORMAT:
            raise RsitrError(f"{meta_p}: unsupported token store format {meta.get('format')}")
        st = cls(top_n=meta.get("top_n"), select=meta.get("select", "norm"), normalize=bool(meta.get("normalize", True)))
        mode = "r" if mmap else None
        try:
            st._tokens = np.load(folder / "tokens.npy", mmap_mode=mode, allow_pickle=False)
            st._mask = np.load(folder / "mask.npy", mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RsitrError(f"{folder}: unreadable token arrays ({exc})") from exc
        if st._tokens.ndim != 3 or st._mask.shape != st._tokens.shape[:2] or st._tokens.shape[0] != int(meta["n"]):
            raise RsitrError(f"{folder}: tokens {st._tokens.shape} / mask {st._mask.shape} do not match meta.json (n={meta['n']})")
        return st


__all__ = ["KINDS", "TokenStore", "VectorIndex", "l2_normalize"]
