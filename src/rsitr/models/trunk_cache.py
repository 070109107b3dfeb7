"""Trunk caches: a backbone's frozen trunks run once over a dataset's images (per augmented view)
and captions, their outputs at the cut stored on disk, so each epoch costs only the heads.

On a CPU the expensive part of training a LiT-style model is running the frozen towers. This is
the code that runs a :class:`~rsitr.models.base.SplitBackbone`'s trunks (directly or through its
:class:`~rsitr.models.engine.InferenceEngine`) and names the cache files; the files themselves,
their container :class:`~rsitr.data.imagesets.TrunkCache` and the time budget are data
(:mod:`rsitr.data.imagesets`). Cache keys are unchanged from when this lived in the data layer:
old caches keep loading.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from rsitr.data.imagesets import CacheBudget, ImageSet, TrunkCache, _cat, _features_to_cpu, _fingerprint, _load_or_compute, iterate_images
from rsitr.data.mixed import own_image_id
from rsitr.data.types import CaptionDataset
from rsitr.models.base import Backbone, SplitBackbone


def supports_trunk_cache(backbone: Backbone) -> bool:
    """Whether ``backbone`` declares a cacheable trunk/head split (a :class:`SplitBackbone`)."""
    return backbone.capabilities.trunk_cache and isinstance(backbone, SplitBackbone)


def trunk_cut(backbone: Backbone, modality: str) -> str | None:
    """Where the backbone's trunk ends for ``modality`` when that is not the whole tower (two-tower
    top mode), else None. A trunk with a cut outputs activations only its head can use: its
    cache keeps the tokens whatever the method needs, and its key names the cut."""
    return backbone.trunk_cut(modality)


def trunk_identity(backbone: Backbone, modality: str) -> dict:
    """What makes two backbones' trunk outputs for ``modality`` the same (what a trunk cache of one
    is valid for the other, as far as the backbone goes): its name, the digests of its pretrained
    weights, the cut and (images) the preprocessing -- the backbone part of a cache key."""
    ident = {"backbone": backbone.info.name, "weights": _weights_identity(backbone.info.weights), "cut": trunk_cut(backbone, modality)}
    if modality == "image":
        ident["pre"] = repr(backbone.preprocess)
    return ident


def _weights_identity(weights: dict) -> dict:
    """What names the pretrained weights in a cache key: their digests (``*sha256*`` entries) and
    format, not where the files are. A key with the file paths changed with every virtualenv,
    clone or site-packages, and each recomputed every cache (a new venv: RSICD's 13 GB again)."""
    if any("sha256" in k for k in weights):
        return {k: v for k, v in weights.items() if "sha256" in k or k == "format"}
    return dict(weights)


def _key(backbone, dataset: CaptionDataset, what: str, extra: dict) -> str:
    """The cache key of ``what`` ("image" | "text") of ``dataset`` under ``backbone``: the backbone's
    name and weight digests, the cut point, ``extra`` (view, seed, preprocessing, tokens) and per
    entry its image id and a fingerprint of the file (its size and 4 KiB from its middle; image keys)
    or its captions (text keys). It does not depend on where the dataset or the weights are: a clean
    checkout beside the same data shares the cache, and an image edited in place gets a new key."""
    h = hashlib.sha256()
    cut = trunk_cut(backbone, what)
    if cut is not None:
        extra = {**extra, "cut": cut}
    h.update(json.dumps({"backbone": backbone.info.name, "weights": _weights_identity(backbone.info.weights), "what": what, **extra},
                        sort_keys=True, default=str).encode())
    for e in dataset.entries:
        # the id an entry of a mix has alone keys it, so a dataset's cache serves every mix it is part of
        h.update(f"{own_image_id(e)}\x00".encode())
        if what == "image":
            h.update(_fingerprint(e.path))
        else:
            h.update("\x00".join(e.captions).encode())
    return h.hexdigest()[:20]


def _describe(backbone, dataset: CaptionDataset, what: str, extra: dict) -> dict:
    """What a cache file holds, written beside it as ``.json`` (``rsitr cache ls`` shows it)."""
    from rsitr.utils.version import __version__

    return {"what": what, "backbone": backbone.info.name, "cut": trunk_cut(backbone, what), **extra,
            "entries": len(dataset), "captions": sum(len(e.captions) for e in dataset.entries),
            "splits": sorted({str(e.split) for e in dataset.entries}), "dataset": str(dataset.source) if dataset.source else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rsitr": __version__}


@torch.no_grad()
def build_trunk_cache(
    backbone: SplitBackbone,
    dataset: CaptionDataset,
    *,
    cache_dir: Path | None,
    views: int = 1,
    train_transform=None,
    eval_transform=None,
    keep_tokens: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    engine=None,
    budget: CacheBudget | None = None,
) -> TrunkCache:
    """Compute (or load) frozen-trunk features for every image view and caption.

    ``engine`` (a :class:`rsitr.models.engine.InferenceEngine` of ``backbone``) runs the trunks
    (ONNX Runtime); None runs them in torch. Both give the same features within 1e-4, so the
    cache key does not depend on it. ``budget``: stop with an error as soon as the work still to
    do cannot finish by its deadline (:class:`CacheBudget`)."""
    from rsitr.utils.progress import progress_bar

    parts = [(a, b) for _, a, b in dataset.parts() if b > a]
    if parts:
        # a mix of datasets (rsitr.data.mixed): each part is cached on its own, under the key it has
        # alone, so a dataset's cache serves every mix it is part of
        kw = dict(cache_dir=cache_dir, views=views, train_transform=train_transform, eval_transform=eval_transform, keep_tokens=keep_tokens,
                  batch_size=batch_size, workers=workers, seed=seed, device=device, progress=progress, engine=engine, budget=budget)
        caches = [build_trunk_cache(backbone, dataset.subset(a, b), **kw) for a, b in parts]
        image = [_cat([c.image[v] for c in caches]) for v in range(len(caches[0].image))] if caches[0].image is not None else None
        text = _cat([c.text for c in caches]) if caches[0].text is not None else None
        keys = tuple(k for c in caches for k in c.keys) if all(c.keys for c in caches) else ()
        return TrunkCache(image, text, keys)

    was_training = backbone.training
    backbone.eval()
    run = engine if engine is not None else backbone
    # a trunk that ends at a cut (top mode) outputs activations its head needs whole: keep them
    keep_image = keep_tokens or trunk_cut(backbone, "image") is not None
    keep_text = keep_tokens or trunk_cut(backbone, "text") is not None
    tick = budget.step if budget is not None else (lambda: None)
    n_img_batches = math.ceil(len(dataset) / batch_size)
    # what is cached already is loaded; the rest is planned first, so that the budget sees all of it
    image_jobs: list = []
    if not backbone.trunk_trainable("image"):
        images_eval = ImageSet(dataset, eval_transform, train=False)
        images_aug = ImageSet(dataset, train_transform, train=True) if train_transform is not None else None
        for v in range(views):
            if v > 0 and images_aug is None:
                break
            # the eval view (0) does not depend on the seed: runs with different seeds share it
            key = _key(backbone, dataset, "image", {"view": v, "seed": seed if v > 0 else None, "tokens": keep_image, "pre": repr(backbone.preprocess)})
            path = cache_dir / f"img-{key}.pt" if cache_dir else None
            if path is not None and not keep_image and not path.is_file():
                # a cache with tokens also serves a run that needs only the pooled features
                tkey = _key(backbone, dataset, "image", {"view": v, "seed": seed if v > 0 else None, "tokens": True, "pre": repr(backbone.preprocess)})
                if (cache_dir / f"img-{tkey}.pt").is_file():
                    image_jobs.append((cache_dir / f"img-{tkey}.pt", None, True, None))
                    continue

            def compute(v=v):
                parts = []
                src = images_eval if v == 0 else images_aug
                seeds = None if v == 0 else [int(s) for s in np.random.default_rng([seed, v, 0xA06]).integers(0, 2**31, len(dataset))]
                it = iterate_images(src, range(len(dataset)), batch_size, workers, seeds)
                for px in progress_bar(it, total=n_img_batches, desc=f"image trunk (view {v})", disable=not progress):
                    parts.append(_features_to_cpu(run.image_trunk(px.to(device)), keep_image))
                    tick()
                return _cat(parts)

            image_jobs.append((path, compute, False, _describe(backbone, dataset, "image", {"view": v, "seed": seed if v > 0 else None, "tokens": keep_image})))
            if budget is not None and not (path is not None and path.is_file()):
                budget.plan(n_img_batches)
    text_job = None
    if not backbone.trunk_trainable("text"):
        texts, _ = dataset.texts()
        key = _key(backbone, dataset, "text", {"tokens": keep_text})
        path = cache_dir / f"txt-{key}.pt" if cache_dir else None
        tpath = cache_dir / f"txt-{_key(backbone, dataset, 'text', {'tokens': True})}.pt" if cache_dir else None
        if path is not None and not keep_text and not path.is_file() and tpath.is_file():
            path = tpath  # the token cache also serves pooled-only runs (tokens dropped below)

        def compute_text():
            parts = []
            for i in progress_bar(range(0, len(texts), batch_size), desc="text trunk", disable=not progress):
                ids = backbone.tokenize(texts[i : i + batch_size]).to(device)
                parts.append(_features_to_cpu(run.text_trunk(ids), keep_text))
                tick()
            return _cat(parts)

        text_job = (path, compute_text, _describe(backbone, dataset, "text", {"tokens": keep_text}))
        if budget is not None and not (path is not None and path.is_file()):
            budget.plan(math.ceil(len(texts) / batch_size))
    image_views = None
    if not backbone.trunk_trainable("image"):
        image_views = []
        for path, compute, drop_tokens, description in image_jobs:
            f = _load_or_compute(path, compute, description, rows=len(dataset))
            image_views.append(_features_to_cpu(f, False) if drop_tokens else f)
    text = None
    if text_job is not None:
        text = _load_or_compute(*text_job, rows=len(texts))
        if not keep_text and text.tokens.numel():
            text = _features_to_cpu(text, False)
    backbone.train(was_training)
    files = [job[0] for job in image_jobs] + ([text_job[0]] if text_job is not None else [])
    keys = tuple(p.stem for p in files) if files and all(p is not None for p in files) else ()
    return TrunkCache(image_views, text, keys)


__all__ = ["build_trunk_cache", "supports_trunk_cache", "trunk_cut", "trunk_identity"]
