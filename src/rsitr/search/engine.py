"""Query an index: text -> tiles, image -> similar tiles, optional re-ranking, thumbnails.

:class:`SearchEngine` loads an index folder (its manifest: :class:`rsitr.search.manifest.IndexManifest`), its model (refused
unless its weights hash to the manifest's), and answers queries. It is safe to share between
threads: model forward passes run under one lock (a 2-core CPU gains nothing from running them
concurrently), vector-store searches under another (a search need not wait for an encode), the
thumbnail cache under a third; everything else is read-only. Text queries that arrive while the
model is busy are encoded together in one call when it is free (:mod:`rsitr.search.coalesce`: a
server under many clients encodes batches instead of one caption at a time; a vector may differ by
float rounding, about 1e-6, from its encode alone).

Scoring and re-ranking (``rerank=``):

* ``"auto"`` (default): rank as the checkpoint's method ranks texts->images in ``rsitr eval``.
  The engine asks the method (:meth:`rsitr.methods.base.Method.candidate_scoring`) how it scores
  a query against candidates recalled by the pooled cosine, and has it rescore them
  (:meth:`~rsitr.methods.base.Method.rescore`): the recall order for the baseline, RDB and PEFT;
  FTF's two-stage rerank of its ``k`` best candidates; iEBAKER's ``local`` mix of the global
  cosine and the local similarity over the top ``rerank_depth`` candidates (eval mixes every
  pair: the two agree wherever the depth covers the candidates that matter). Candidates beyond the
  rescored ones follow in recall order, as in eval's two-stage matrix. What cannot be applied is
  said once per engine with a warning, never skipped silently: an index without image tokens
  (built without ``--keep-tokens``) for a method that scores with them -- then ranked by the
  pooled cosine --, and iEBAKER's SAR, which needs a set of queries (see ``"sar"``).
* ``"none"``: the vector index order (cosine of pooled embeddings), whatever the method.
* ``"ftf"``: the top ``rerank_depth`` candidates are re-scored by the FTF fine-grained stage
  (:mod:`rsitr.retrieval.twostage`) with the index's token store (built with ``--keep-tokens``)
  and the query's word tokens, with the two-stage parameters (``alpha``, ``tau``, ``balance``,
  ``renorm``) of the method the checkpoint was trained with -- the scores ``rsitr eval`` ranks
  by. A checkpoint whose method has no two-stage scoring (or a plain backbone) gets the
  parameter-free interaction with the library defaults (:class:`~rsitr.retrieval.twostage.TwoStageParams`).
* ``"sar"``: not available for a single query. SAR (iEBAKER) re-sorts a candidate list by the
  *reverse* rank of the query in each candidate's own ranking of a *set of texts*; one free-text
  query has no such set, so the reverse ranks are undefined. It is refused with an explanation
  (use ``rsitr eval`` on a caption dataset for SAR).

Footprint filter (``bbox=`` on every search, ``W,S,E,N`` in WGS84): only items whose footprint
intersects the box are ranked (:mod:`rsitr.retrieval.bbox`); the index's vector store applies it
(FAISS: filter then rank, exact; a database store pushes the box down as a filter). With ``--rerank ftf`` the
recall stage is filtered. Items without a footprint never match a box.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.search.manifest import IndexManifest, load_model as _load_model, model_identity
from rsitr.search.sources import Item, read_item
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

RERANKS = ("auto", "none", "ftf", "qbnorm", "sar")
SAR_UNAVAILABLE = ("--rerank sar is not available for a single query: SAR re-sorts candidates by the reverse rank of the query "
                   "among a set of texts each candidate image ranks, and a free-text search has no such query set. "
                   "Use `rsitr eval` on a caption dataset for SAR, or --rerank ftf with an index built with --keep-tokens.")


TEXT_BATCH = 32  # most text queries encoded in one call (rsitr.search.coalesce)


class SearchEngine:
    def __init__(self, index_dir: str | Path, *, checkpoint: str | None = None, model=None, device: str = "cpu",
                 load_model: bool = True, thumb_cache: int = 256, engine: str = "auto", onnx_cache: str | None = None,
                 store_options: dict | None = None):
        """``model``: the index's :class:`~rsitr.methods.factory.LoadedModel` when already loaded
        (default: loaded from ``checkpoint``, else the checkpoint the manifest names);
        ``store_options``: overrides of the recorded store options that the index's store allows on a
        reopen (``{key: value}``, e.g. another address of the same collection served by a cluster)."""
        self.index_dir = Path(index_dir)
        self._store_options = dict(store_options or {})
        self._tokens = None
        self._qbank = None
        self._qb_z = None  # QB-Norm normaliser per tile (NaN: not computed yet)
        self._warned: set[str] = set()  # what "auto" scoring could not apply, said once
        # `rsitr index add` may commit a new generation (manifest first, then the old files are
        # removed) while this reads: the files of the manifest read are then gone, and the new
        # manifest is read again. Everything is opened here (the memory maps keep a generation's
        # files readable after their removal), so a running server always answers from one
        # complete generation, never from a half-written one.
        for attempt in range(5):
            try:
                self._open_generation()
                break
            except FileNotFoundError as exc:
                if IndexManifest.load(self.index_dir).generation == self.manifest.generation:  # not a commit: damage
                    raise self.manifest.missing(Path(exc.filename or "").name, self.index_dir) from exc
                if attempt == 4:
                    raise RsitrError(f"{self.index_dir}: the index changed under every attempt to open it ({exc.filename})") from exc
                time.sleep(0.2)
        self.device = device
        # three locks, never taken in another order than model -> store: the model's forward passes,
        # the vector store's searches (FAISS is fast; its searches need not wait for an encode), and the
        # thumbnail cache (a cache lookup must not wait for either)
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._thumb_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[int, int, str], bytes] = OrderedDict()
        self._thumb_cache = int(thumb_cache)
        self.model = self.encoder = None  # the backbone, and its no-grad encoder
        self._spec = checkpoint or self.manifest.model.checkpoint  # the model's spec (a shipped model brings its query bank)
        self.method = None  # the method it was trained with (None: a plain backbone)
        if model is not None or load_model:
            from rsitr.models.engine import engine_for

            spec = self._spec
            m = model if model is not None else _load_model(spec, device)
            self.manifest.check_model(model_identity(spec, m), self.index_dir)
            if warning := self.manifest.untrained_warning():
                log.warning("%s: %s", self.index_dir, warning)
            m.eval()
            self.model, self.method = m.backbone, m.method
            # query encodes (no grad) through ONNX Runtime where available: same vectors within 1e-4
            self.encoder = engine_for(self.model, engine, cache_dir=onnx_cache)
        from rsitr.search.coalesce import Coalescer

        self._texts = Coalescer(self._encode_texts, max_batch=TEXT_BATCH)

    # -- info ------------------------------------------------------------------------------------
    def _open_generation(self) -> None:
        self.manifest = m = IndexManifest.load(self.index_dir)
        if not m.files:
            raise RsitrError(f"{self.index_dir}: the index is empty (its build has not finished: run the same `rsitr index build` again)")
        self.items: list[Item] = m.read_items(self.index_dir)
        self.embeddings = m.read_embeddings(self.index_dir, mmap=True)
        if len(self.items) != m.count or self.embeddings.shape[0] != len(self.items):
            raise RsitrError(f"{self.index_dir}: items ({len(self.items)}), embeddings ({self.embeddings.shape[0]}) and manifest count "
                             f"({m.count}) disagree; rebuild the index")
        from rsitr.retrieval.index import TokenStore
        from rsitr.retrieval.stores import StoreContext, open_store

        ctx = StoreContext(self.index_dir, m.embed_dim, m.index_kind, dict(m.files), footprints=lambda: [it.wgs84 for it in self.items])
        vectors = open_store(m.store, ctx, self._store_options)
        n = len(vectors)
        if n != len(self.items) or vectors.dim != m.embed_dim:
            vectors.close()
            raise RsitrError(f"{self.index_dir}: {vectors.where()} holds {n} vectors of size {vectors.dim} but the index has "
                             f"{len(self.items)} items of size {m.embed_dim}; rebuild the index")
        self.vectors = vectors
        name = m.files.get("tokens")
        self._tokens = TokenStore.load(self.index_dir / name) if m.tokens and name else None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_geo(self) -> bool:
        return any(it.wgs84 for it in self.items)

    def close(self) -> None:
        """Release the vector store (an embedded database file may be open in one process at a time)."""
        self.vectors.close()

    def info(self) -> dict[str, Any]:
        """The index in a few fields (``/healthz``, the page header); ``model_warning``: the line
        :meth:`IndexManifest.untrained_warning` says when its model has untrained heads, else None."""
        m = self.manifest
        from rsitr.search.build import manifest_tiling

        return {"items": len(self.items), "embed_dim": m.embed_dim, "index_kind": m.index_kind, "store": self.vectors.kind,
                "model": m.model.checkpoint, "backbone": m.backbone_name, "tokens": m.tokens, "geo": self.has_geo,
                "tiling": manifest_tiling(m).describe(), "created": m.created, "updated": m.updated,
                "model_warning": m.untrained_warning()}

    def item(self, item_id: int) -> Item:
        if not 0 <= int(item_id) < len(self.items):
            raise KeyError(item_id)
        return self.items[int(item_id)]

    # -- encoding --------------------------------------------------------------------------------
    def _need_model(self):
        if self.model is None:
            raise RsitrError("this engine was opened without its model (load_model=False); text/image queries need it")
        return self.model

    @torch.no_grad()
    def _text_features(self, query: str):
        model = self._need_model()
        ids = model.tokenize([query]).to(self.device)
        return self.encoder.text_features(ids), ids

    def encode_text(self, query: str) -> np.ndarray:
        """The L2-normalised embedding ``[1, D]`` of ``query`` (concurrent calls are batched)."""
        self._need_model()
        return self._texts.encode(query)

    def _encode_texts(self, queries: list[str]) -> np.ndarray:
        from rsitr.models.engine import encode_texts

        model = self._need_model()
        with self._lock:
            return encode_texts(model, list(queries), self.encoder, batch_size=max(1, len(queries))).numpy()

    @torch.no_grad()
    def encode_image(self, image) -> np.ndarray:
        """``image``: a PIL image (converted to RGB) or a file path (read as index items are)."""
        from PIL import Image

        from rsitr.data.transforms import EvalTransform

        model = self._need_model()
        if not isinstance(image, Image.Image):
            from rsitr.search.sources import scan_file

            its = scan_file(Path(image).resolve(), self.manifest.tile_size, 0)
            if len(its) == 1:
                image = read_item(its[0])  # read exactly as an indexed item would be
            else:  # a georeferenced scene larger than a tile as the query: the whole raster
                from rsitr.data.images import load_image

                image = load_image(image, stretch="p2-98")
        px = EvalTransform(model.preprocess)(image.convert("RGB"))[None].to(self.device)
        with self._lock:
            e = self.encoder.encode_image(px).float()
        return torch.nn.functional.normalize(e, dim=-1).cpu().numpy()

    # -- search ----------------------------------------------------------------------------------
    def _results(self, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        out = []
        for s, i in zip(scores.tolist(), ids.tolist()):
            if i < 0:
                continue
            it = self.items[i]
            out.append({"rank": len(out) + 1, "id": int(i), "score": float(s), "path": it.path, "window": it.window,
                        "bounds": it.bounds, "crs": it.crs, "wgs84": it.wgs84, "scale_m": it.extra.get("scale_m"),
                        "whole_scene": bool(it.extra.get("whole_scene")), "scene": self.scene_of(int(i))})
        return out

    def search_vector(self, q: np.ndarray, k: int, bbox=None) -> list[dict]:
        """``bbox``: ``None`` or a WGS84 box (``"W,S,E,N"`` / :class:`rsitr.retrieval.bbox.BBox`)."""
        scores, ids = self._nearest(q, k, _bbox(bbox))
        return self._results(scores, ids)

    def _nearest(self, q: np.ndarray, k: int, box=None) -> tuple[np.ndarray, np.ndarray]:
        """The vector store's ``k`` best (scores, ids) for the one query ``q`` (ids -1: none)."""
        k = int(k)
        if k < 1:
            raise RsitrError(f"k must be >= 1, got {k}")
        with self._store_lock:
            scores, ids = self.vectors.search(q, k, box) if box is not None else self.vectors.search(q, k)
        return scores[0], ids[0]

    def search(self, query: str, k: int = 20, rerank: str = "auto", rerank_depth: int = 100, bbox=None) -> list[dict]:
        query = (query or "").strip()
        if not query:
            raise RsitrError("empty query")
        if rerank not in RERANKS:
            raise RsitrError(f"--rerank must be one of {RERANKS}, got {rerank!r}")
        if rerank == "sar":
            raise RsitrError(SAR_UNAVAILABLE)
        box = _bbox(bbox)
        if rerank == "none":
            return self.search_vector(self.encode_text(query), k, box)
        if rerank == "qbnorm":
            return self._search_qbnorm(query, int(k), int(rerank_depth), box)
        if rerank == "auto":
            return self._search_method(query, int(k), int(rerank_depth), box)
        return self._search_ftf(query, int(k), int(rerank_depth), box)

    def search_image(self, image, k: int = 20, exclude_self: bool = False, bbox=None) -> list[dict]:
        box = _bbox(bbox)
        res = self.search_vector(self.encode_image(image), k + (1 if exclude_self else 0), box)
        if exclude_self and res and res[0]["score"] > 0.9999:
            res = res[1:]
            for r, d in enumerate(res, 1):
                d["rank"] = r
        return res[:k]

    # -- FTF -------------------------------------------------------------------------------------
    def _token_store(self):
        if self._tokens is None:  # opened with the generation (see __init__)
            raise RsitrError(f"{self.index_dir}: --rerank ftf needs the image token store; rebuild the index with --keep-tokens")
        return self._tokens

    def _search_ftf(self, query: str, k: int, depth: int, box=None) -> list[dict]:
        """FTF two-stage search: recall ``depth`` tiles by the pooled cosine, rerank them with the
        parameter-free text-guided interaction over the stored patch tokens
        (:func:`rsitr.retrieval.twostage.rescore`, ``final = (1-alpha) coarse + alpha fine``),
        with the checkpoint method's two-stage parameters (see the module doc)."""
        from rsitr.retrieval import twostage

        store = self._token_store()
        params = (self.method.two_stage_params() if self.method is not None else None) or twostage.TwoStageParams()

        def fn(coarse, q, tokens, mask):
            return twostage.rescore(coarse, q.tokens, q.mask, tokens, mask, params)

        return self._search_rescored(query, k, max(k, depth), box, fn, store)

    # -- through the checkpoint's method ---------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _search_method(self, query: str, k: int, depth: int, box=None) -> list[dict]:
        """``rerank="auto"``: rank as the checkpoint's method does (see the module doc)."""
        from rsitr.methods.base import CandidateScoring

        method = self.method
        plan = method.candidate_scoring() if method is not None else CandidateScoring()
        name = method.name if method is not None else "none"
        if plan.unavailable:
            self._warn_once("unavailable", f"{self.index_dir}: search ranks unlike `rsitr eval` for this {name} checkpoint: {plan.unavailable}")
        if plan.kind == "cosine":
            return self.search_vector(self.encode_text(query), k, box)
        if plan.needs_tokens and self._tokens is None:
            self._warn_once("tokens", f"{self.index_dir}: the {name} checkpoint scores with {plan.kind} over image tokens, which this index "
                                      "does not store: results are ranked by the pooled cosine, not as `rsitr eval` ranks them; "
                                      "rebuild the index with --keep-tokens")
            return self.search_vector(self.encode_text(query), k, box)
        return self._search_rescored(query, k, plan.depth if plan.depth is not None else depth, box, method.rescore,
                                     self._tokens if plan.needs_tokens else None)

    @torch.no_grad()
    def _search_rescored(self, query: str, k: int, depth: int, box, rescore, store) -> list[dict]:
        """Recall ``max(k, depth)`` tiles by the pooled cosine, rescore the first ``depth`` with
        ``rescore(coarse [1, d], query Features, tokens [1, d, Np, dim], mask [1, d, Np])`` (the
        tiles' stored tokens; empty without a ``store``) and rank them by it; recalled tiles beyond
        ``depth`` follow in recall order."""
        from rsitr.models.base import Features

        if k < 1:
            raise RsitrError(f"k must be >= 1, got {k}")
        depth = max(1, int(depth))
        with self._lock:
            tf, _ = self._text_features(query)
            q = torch.nn.functional.normalize(tf.pooled.float(), dim=-1).cpu().numpy()
            recall = self.vectors if box is None else _Filtered(self.vectors, box)
            with self._store_lock:
                coarse, ids = recall.search(q, max(k, depth))
            coarse, ids = coarse[0], ids[0]
            keep = ids >= 0
            coarse, ids = coarse[keep].astype(np.float32), ids[keep]
            head = ids[:depth]
            if len(head) == 0:
                return []
            if store is not None:
                tokens, mask = store.get(head[None])
            else:
                tokens, mask = torch.zeros(1, len(head), 0, 0), torch.zeros(1, len(head), 0, dtype=torch.bool)
            q_feat = Features(tf.pooled.float().cpu(), tf.tokens.float().cpu(), tf.mask.cpu())
            new = rescore(torch.from_numpy(coarse[: len(head)])[None], q_feat, tokens, mask)[0].float().numpy()
        order = np.argsort(-new, kind="stable")
        scores = np.concatenate([new[order], coarse[len(head):]])[:k]
        return self._results(scores, np.concatenate([head[order], ids[len(head):]])[:k])

    # -- QB-Norm ---------------------------------------------------------------------------------
    # (the index's own bank, else the shipped model's: see query_bank)
    def query_bank(self):
        """The query bank QB-Norm uses (:mod:`rsitr.search.qbank`): ``(bank [B, D], metadata)``; the
        metadata's ``bank`` says which one in words. The index's own bank (``rsitr index qbank``)
        wins; an index built with a shipped model that has none uses the model's shipped bank
        (:func:`rsitr.models.shipped.shipped_query_bank`)."""
        if self._qbank is None:
            from rsitr.search.qbank import load_query_bank

            got = load_query_bank(self.index_dir, self.manifest)
            if got is not None:
                bank, meta = got
                meta = {**meta, "origin": "index",
                        "bank": f"the index's own query bank ({meta['count']} captions of {meta['source']} [{meta['split']}])"}
            else:
                bank, meta = self._shipped_bank()
            self._qbank = (bank, meta)
        return self._qbank

    def _shipped_bank(self):
        """The shipped query bank of the index's model (a shipped model), or the error saying how to make one."""
        from rsitr.models.shipped import query_bank_of

        got = query_bank_of(self._spec)
        if got is None:
            raise RsitrError(f"{self.index_dir}: --rerank qbnorm needs a query bank: the index has none and its model "
                             f"({self._spec}) ships none; make one with `rsitr index qbank {self.index_dir} CAPTIONS` "
                             f"(e.g. the model's training captions)")
        name, bank, meta = got
        if bank.shape[1] != self.manifest.embed_dim:
            raise RsitrError(f"{self.index_dir}: the shipped query bank of {self._spec} has {bank.shape[1]} dimensions, the index "
                             f"{self.manifest.embed_dim}: the index was built with another model; make a bank with `rsitr index qbank`")
        return bank, {**meta, "origin": "shipped", "source": f"shipped:{name}",
                      "bank": f"the shipped model {name}'s query bank ({meta['count']} of its training captions)"}

    @torch.no_grad()
    def _search_qbnorm(self, query: str, k: int, depth: int, box=None) -> list[dict]:
        """Recall ``depth`` tiles by the cosine, re-rank them by ``cosine - z`` (QB-Norm's inverted
        softmax over the index's query bank, :func:`rsitr.retrieval.qbnorm.bank_normalizers`)."""
        from rsitr.retrieval.qbnorm import bank_normalizers

        if k < 1:
            raise RsitrError(f"k must be >= 1, got {k}")
        bank, meta = self.query_bank()
        scores, ids = self._nearest(self.encode_text(query), max(k, depth), box)
        keep = ids >= 0
        scores, ids = scores[keep], ids[keep]
        if len(ids) == 0:
            return []
        with self._lock:  # z depends on the tile and the bank only: computed once per tile, then looked up
            if self._qb_z is None or len(self._qb_z) != len(self.items):
                self._qb_z = np.full(len(self.items), np.nan, dtype=np.float32)
            todo = np.unique(ids[np.isnan(self._qb_z[ids])])
            if len(todo):
                cand = torch.from_numpy(np.asarray(self.embeddings[todo], dtype=np.float32))
                self._qb_z[todo] = bank_normalizers(cand, bank, float(meta["beta"])).numpy()
            z = self._qb_z[ids]
        new = scores - z
        top = np.argsort(-new, kind="stable")[:k]
        return self._results(new[top], ids[top])

    # -- thumbnails ------------------------------------------------------------------------------
    def thumbnail(self, item_id: int, size: int = 256, fmt: str = "JPEG") -> bytes:
        """The item rendered to at most ``size`` px (long side), encoded as JPEG/PNG (cached)."""
        it = self.item(item_id)

        def render():
            img = read_item(it)
            img.thumbnail((size, size))
            return img

        return self._encoded((int(item_id), int(size), fmt), render, fmt)

    def _encoded(self, key: tuple, render, fmt: str) -> bytes:
        """``render()`` (a PIL image) encoded as ``fmt``, kept in the LRU image cache under ``key``."""
        with self._thumb_lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        img = render()
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=88) if fmt == "JPEG" else img.save(buf, format=fmt)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._thumb_cache:
                self._thumbs.popitem(last=False)
        return data

    # -- scenes ----------------------------------------------------------------------------------
    def _scene_table(self) -> tuple[list[str], dict[str, int]]:
        """Scenes = the distinct rasters that tiles were cut from, numbered in item order."""
        items = self.items
        if getattr(self, "_scenes_for", None) is not items:
            paths: list[str] = []
            ids: dict[str, int] = {}
            for it in items:
                if it.window is not None and it.path not in ids:
                    ids[it.path] = len(paths)
                    paths.append(it.path)
            self._scenes, self._scene_ids, self._scenes_for = paths, ids, items
        return self._scenes, self._scene_ids

    def scene_of(self, item_id: int) -> int | None:
        """The scene id of a tile (None: a whole-image item)."""
        it = self.items[int(item_id)]
        return self._scene_table()[1].get(it.path) if it.window is not None else None

    def scene(self, scene_id: int) -> dict[str, Any]:
        """``{"id", "path", "name", "width", "height", "tiles"}`` of scene ``scene_id`` (KeyError: none)."""
        paths, _ = self._scene_table()
        if not 0 <= int(scene_id) < len(paths):
            raise KeyError(scene_id)
        path = paths[int(scene_id)]
        from rsitr.data.images import rasterio_or_none

        rio = rasterio_or_none()
        try:
            with rio.open(path) as ds:
                w, h = ds.width, ds.height
        except Exception as exc:  # noqa: BLE001 - a scene moved or damaged since the build
            raise RsitrError(f"{path}: cannot open the scene ({exc})") from exc
        return {"id": int(scene_id), "path": path, "name": Path(path).name, "width": w, "height": h,
                "tiles": sum(1 for it in self.items if it.path == path)}

    def quicklook(self, scene_id: int, size: int = 1024) -> bytes:
        """PNG of scene ``scene_id``: the whole raster downsampled to ``size`` px (long side), with
        the scene's own stretch (:func:`rsitr.search.scenes.quicklook`; cached like thumbnails)."""
        from rsitr.search.scenes import quicklook

        paths, _ = self._scene_table()
        if not 0 <= int(scene_id) < len(paths):
            raise KeyError(scene_id)
        path = paths[int(scene_id)]
        # DataError (an RsitrError) names the file; keys of scenes are negative, of items not
        return self._encoded((-1 - int(scene_id), int(size), "PNG"), lambda: quicklook(path, size)[0], "PNG")


def _bbox(bbox):
    if bbox is None or (isinstance(bbox, str) and not bbox.strip()):
        return None
    from rsitr.retrieval.bbox import parse_bbox

    return parse_bbox(bbox)


class _Filtered:
    """A store seen through a footprint filter, with :class:`VectorIndex`'s ``search(q, k)``."""

    def __init__(self, store, box):
        self.store, self.box = store, box

    def search(self, q, k):
        return self.store.search(q, k, self.box)
