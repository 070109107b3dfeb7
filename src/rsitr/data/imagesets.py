"""Image sets (decoded, transformed image batches of a dataset) and cached frozen-trunk features.

On a CPU the expensive part of training a LiT-style model is running the frozen towers;
when a tower's trunk is frozen its outputs are computed once per image/caption (and per
augmented view) and cached on disk next to the run, so each epoch costs only the heads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsitr.data.mixed import own_image_id
from rsitr.data.types import CaptionDataset, Features
from rsitr.utils.errors import RsitrError
from rsitr.utils.cachedir import mark_used
from rsitr.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)


# -- images --------------------------------------------------------------------------------
class ImageSet(Dataset):
    """Image tensors of a dataset's entries under a transform. ``item_seed`` makes the random
    augmentation of (image, epoch, position) reproducible across resumes and worker counts."""

    def __init__(self, dataset: CaptionDataset, transform, train: bool):
        self.paths = [e.path for e in dataset.entries]
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, seed: int | None = None) -> torch.Tensor:
        from rsitr.data.images import load_image

        img = load_image(self.paths[index])
        if self.train:
            return self.transform(img, rng=np.random.default_rng(seed))
        return self.transform(img)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            return self.load(index, seed)
        return self.load(key)


def make_transforms(backbone, augment) -> tuple:
    from rsitr.data.transforms import EvalTransform, TrainTransform

    eval_tf = EvalTransform(backbone.preprocess)
    if not augment.enabled:
        return eval_tf, None
    train_tf = TrainTransform(backbone.preprocess, scale=tuple(augment.scale), hflip=augment.hflip, vflip=augment.vflip, rot90=augment.rot90)
    return eval_tf, train_tf


def iterate_images(images: ImageSet, indices, batch_size: int, workers: int = 0, seeds=None):
    """Yield stacked image batches in order (decoding in ``workers`` processes)."""
    keys = list(indices) if seeds is None else list(zip(indices, seeds))
    loader = DataLoader(
        _Keyed(images, keys), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=torch.stack, persistent_workers=False
    )
    yield from loader


class _Keyed(Dataset):
    def __init__(self, base: ImageSet, keys: list):
        self.base, self.keys = base, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        return self.base[self.keys[i]]


# -- trunk feature cache ------------------------------------------------------------------
def supports_trunk_cache(backbone) -> bool:
    return all(hasattr(backbone, n) for n in ("image_trunk", "image_head", "text_trunk", "text_head", "trunk_trainable"))


@dataclass
class TrunkCache:
    """Frozen-trunk outputs: ``image[v]`` is a Features over all images for view v (view 0 is
    the eval transform); ``text`` a Features over all captions in ``dataset.texts()`` order.
    Missing modalities (trainable trunk) are None."""

    image: list[Features] | None
    text: Features | None

    def subset(self, dataset: CaptionDataset, start: int, stop: int) -> "TrunkCache":
        """The cache of ``dataset.subset(start, stop)`` (this cache is ``dataset``'s)."""
        t0 = sum(len(e.captions) for e in dataset.entries[:start])
        t1 = t0 + sum(len(e.captions) for e in dataset.entries[start:stop])

        def cut(f: Features, a: int, b: int) -> Features:
            return Features(f.pooled[a:b], f.tokens[a:b], f.mask[a:b])

        return TrunkCache([cut(f, start, stop) for f in self.image] if self.image is not None else None,
                          cut(self.text, t0, t1) if self.text is not None else None)


def trunk_cut(backbone, modality: str) -> str | None:
    """Where the backbone's trunk ends for ``modality`` when that is not the whole tower (two-tower
    top mode), else None. A trunk with a cut outputs activations only its head can use: its
    cache keeps the tokens whatever the method needs, and its key names the cut."""
    f = getattr(backbone, "trunk_cut", None)
    return f(modality) if f is not None else None


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


_FINGERPRINTS: dict = {}


def _fingerprint(path) -> bytes:
    """Size + 4 KiB from the middle of the file (b"-" when it cannot be read); memoised per
    (path, size, mtime) so a run's several keys read each file once."""
    try:
        st = Path(path).stat()
    except (OSError, TypeError):
        return b"-"
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _FINGERPRINTS:
        with open(path, "rb") as f:
            f.seek(max(0, st.st_size // 2 - 2048))
            _FINGERPRINTS[memo] = str(st.st_size).encode() + b":" + hashlib.sha256(f.read(4096)).digest()[:8]
    return _FINGERPRINTS[memo]


def _features_to_cpu(f: Features, keep_tokens: bool) -> Features:
    if keep_tokens:
        return Features(f.pooled.float().cpu(), f.tokens.half().cpu(), f.mask.cpu())
    return Features(f.pooled.float().cpu(), f.pooled.new_zeros(f.pooled.shape[0], 0, f.pooled.shape[1]).cpu(), torch.zeros(f.pooled.shape[0], 0, dtype=torch.bool))


def _cat(parts: list[Features]) -> Features:
    if not parts:
        raise ValueError("nothing to concatenate")
    # text token counts differ between batches: pad to the longest
    n = max(p.tokens.shape[1] for p in parts)
    toks, masks = [], []
    for p in parts:
        pad = n - p.tokens.shape[1]
        toks.append(torch.nn.functional.pad(p.tokens, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(p.mask, (0, pad), value=False))
    tokens, mask = torch.cat(toks), torch.cat(masks)
    # trailing columns that are padding in every row (text trunks pad to the context length) are
    # dropped: an RSICD caption cache would otherwise be mostly zeros
    used = mask.any(dim=0).nonzero()
    n_used = int(used.max()) + 1 if used.numel() else min(1, mask.shape[1])
    return Features(torch.cat([p.pooled for p in parts]), tokens[:, :n_used], mask[:, :n_used])


def _describe(backbone, dataset: CaptionDataset, what: str, extra: dict) -> dict:
    """What a cache file holds, written beside it as ``.json`` (``rsitr cache ls`` shows it)."""
    from rsitr.utils.version import __version__

    return {"what": what, "backbone": backbone.info.name, "cut": trunk_cut(backbone, what), **extra,
            "entries": len(dataset), "captions": sum(len(e.captions) for e in dataset.entries),
            "splits": sorted({str(e.split) for e in dataset.entries}), "dataset": str(dataset.source) if dataset.source else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rsitr": __version__}


def _load_or_compute(path: Path | None, compute, description: dict | None = None) -> Features:
    if path is not None and path.is_file():
        from rsitr.utils.weights import load_torch_file

        d = load_torch_file(path, what="trunk-feature cache (delete it to recompute)")
        mark_used(path)  # its last use, for `rsitr cache prune`
        log.info("loaded cached trunk features %s", path)
        return Features(d["pooled"], d["tokens"], d["mask"])
    f = compute()
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save({"pooled": f.pooled, "tokens": f.tokens, "mask": f.mask}, tmp)
        if description is not None:
            atomic_write_json(path.with_suffix(".json"), description)
    return f


class CacheBudget:
    """How long trunk caching may take: ``deadline`` is a ``time.perf_counter()`` value. After each
    batch the time still needed is extrapolated from the batches done so far (the first batch,
    which pays for warm-up, is left out once there are others); if caching cannot finish by the
    deadline it stops with an error before it uses the budget up. ``budget`` (seconds) and
    ``what`` only word the message."""

    def __init__(self, deadline: float, budget: float, what: str = "time_budget"):
        self.deadline, self.budget, self.what = deadline, budget, what
        self.total = self.done = 0
        self.t0 = self.t1 = None

    def plan(self, batches: int) -> None:
        self.total += batches

    def step(self) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        self.done += 1
        if self.done == 1:
            self.t1 = now
        left = self.total - self.done
        if self.done >= 3:
            rate = (now - self.t1) / (self.done - 1)
        else:
            rate = (now - self.t0) / self.done if self.done > 1 else None
        need = now + (rate * left if rate is not None else 0.0)
        if now > self.deadline or (rate is not None and need > self.deadline):
            total_s = (now - self.t0) + (rate or 0.0) * left
            raise RsitrError(
                f"{self.what}={self.budget:g} s cannot cover caching the frozen trunks: {self.done} of {self.total} batches took "
                f"{now - self.t0:.0f} s, about {total_s:.0f} s in all at this pace; stopped before training. Raise {self.what}, "
                f"or run once without it: finished cache files are kept and reused")


@torch.no_grad()
def build_trunk_cache(
    backbone,
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
        return TrunkCache(image, text)

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
            f = _load_or_compute(path, compute, description)
            image_views.append(_features_to_cpu(f, False) if drop_tokens else f)
    text = None
    if text_job is not None:
        text = _load_or_compute(*text_job)
        if not keep_text and text.tokens.numel():
            text = _features_to_cpu(text, False)
    backbone.train(was_training)
    return TrunkCache(image_views, text)


def select(f: Features, index: torch.Tensor, device: torch.device) -> Features:
    return Features(f.pooled[index].to(device), f.tokens[index].to(device).float(), f.mask[index].to(device))
