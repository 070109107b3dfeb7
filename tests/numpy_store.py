"""A test-only vector store, all in this one module: vectors and footprints as ``.npy`` files in the
index folder, exact search with numpy. It proves that a store is one module: registered with
:func:`rsitr.retrieval.stores.register_store` by the test that uses it, with its own options
dataclass and a spelled CLI flag, and nothing else in rsitr names it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsitr.retrieval.bbox import footprint_array, intersects, parse_bbox
from rsitr.retrieval.stores import StoreContext, StoreFlag, VectorStore
from rsitr.utils.errors import RsitrError

KIND = "numpy-test"


@dataclasses.dataclass
class NumpyOptions:
    """``prefix``: the vector file's name prefix in the index folder; ``scale``: recorded, reopen may override."""

    prefix: str = "npvec"
    scale: int = 1


class NumpyStore(VectorStore):
    kind = KIND
    Options = NumpyOptions
    open_options = frozenset({"scale"})
    cli_flags = (StoreFlag("--np-prefix", "prefix", "--store numpy-test: vector file prefix"),
                 StoreFlag("--np-scale", "scale", "--store numpy-test: score multiplier", reopen=True))
    opened: list[dict] = []  # (test hook) the options every open_for_index saw

    def __init__(self, vectors: np.ndarray, fp: np.ndarray, geo: np.ndarray, scale: int = 1):
        self.vectors, self._fp, self._geo, self.scale = vectors, fp, geo, scale
        self.dim, self.index_kind = int(vectors.shape[1]), "flat"

    @classmethod
    def create_for_index(cls, index_dir: Path, dim: int, index_kind: str, options: NumpyOptions) -> dict:
        if index_kind != "flat":
            raise RsitrError(f"--store {KIND} is exact only (index kind flat)")
        return {"kind": KIND, "prefix": options.prefix, "scale": int(options.scale)}

    @classmethod
    def check_spec(cls, spec: dict) -> str | None:
        return None if isinstance(spec.get("prefix"), str) else "a numpy-test store needs a 'prefix'"

    @classmethod
    def write_generation(cls, spec: dict, ctx: StoreContext, emb: np.ndarray, records: Sequence[dict], n_old: int, gen: int) -> dict:
        files = {"vectors": f"{spec['prefix']}.{gen:06d}.npy", "footprints": f"{spec['prefix']}-fp.{gen:06d}.npy"}
        fp, geo = footprint_array([r.get("wgs84") for r in records])
        np.save(ctx.index_dir / files["vectors"], np.asarray(emb, np.float32))
        np.save(ctx.index_dir / files["footprints"], np.concatenate([fp, geo[:, None].astype(np.float64)], axis=1))
        return files

    @classmethod
    def open_for_index(cls, spec: dict, ctx: StoreContext, options: NumpyOptions | None = None) -> "NumpyStore":
        scale = options.scale if options is not None else int(spec.get("scale", 1))
        cls.opened.append({"scale": scale})
        v = np.load(ctx.index_dir / ctx.files["vectors"])
        f = np.load(ctx.index_dir / ctx.files["footprints"])
        return cls(v, f[:, :4], f[:, 4] > 0.5, scale)

    def add(self, vectors: Any, records: Sequence[dict]) -> None:
        raise RsitrError("NumpyStore is written by write_generation only")

    def __len__(self) -> int:
        return len(self.vectors)

    def ids_in(self, bbox) -> np.ndarray:
        return np.flatnonzero(intersects(self._fp, self._geo, parse_bbox(bbox))).astype(np.int64)

    def search(self, q: Any, k: int, bbox=None) -> tuple[np.ndarray, np.ndarray]:
        qm = self._query(q)
        ids = np.arange(len(self.vectors)) if bbox is None else self.ids_in(bbox)
        sc = (qm @ self.vectors[ids].T) * self.scale
        k = min(int(k), len(ids))
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sc, order, 1).astype(np.float32), ids[order].astype(np.int64)

    def spec(self) -> dict:
        return {"kind": KIND}
