"""Image sets (decoded, transformed image batches of a dataset) and the data side of cached
frozen-trunk features: the :class:`TrunkCache` container, the cache files (read, written whole,
marked used), file fingerprints for their keys and the caching time budget.

Running a backbone's trunks to fill a cache is :mod:`rsitr.models.trunk_cache` (the models layer).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsitr.data.types import CaptionDataset, Features
from rsitr.utils.errors import RsitrError
from rsitr.utils.cachedir import StaleItem, load_or_compute, mark_used

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
@dataclass
class TrunkCache:
    """Frozen-trunk outputs: ``image[v]`` is a Features over all images for view v (view 0 is
    the eval transform); ``text`` a Features over all captions in ``dataset.texts()`` order.
    Missing modalities (trainable trunk) are None. ``keys``: the content keys of the cache files
    it was read from or written to, in order (every image view, then the text; each part of a mix
    in turn), which name its content; empty when it has no files (no ``cache_dir``) or is a cut of
    another cache -- then nothing derived from it is stored either."""

    image: list[Features] | None
    text: Features | None
    keys: tuple[str, ...] = ()

    def subset(self, dataset: CaptionDataset, start: int, stop: int) -> "TrunkCache":
        """The cache of ``dataset.subset(start, stop)`` (this cache is ``dataset``'s)."""
        t0 = sum(len(e.captions) for e in dataset.entries[:start])
        t1 = t0 + sum(len(e.captions) for e in dataset.entries[start:stop])

        def cut(f: Features, a: int, b: int) -> Features:
            return Features(f.pooled[a:b], f.tokens[a:b], f.mask[a:b])

        return TrunkCache([cut(f, start, stop) for f in self.image] if self.image is not None else None,
                          cut(self.text, t0, t1) if self.text is not None else None)


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


def _load_or_compute(path: Path | None, compute, description: dict | None = None, rows: int | None = None) -> Features:
    """A trunk-feature cache (``rows`` entries when given) through :func:`load_or_compute`. ``compute``
    None: the item can only be read (a token cache serving a pooled-only run), so one that cannot
    be used is an error naming it."""

    def load(p: Path, what: str = "trunk-feature cache") -> Features:
        from rsitr.utils.weights import load_torch_file

        d = load_torch_file(p, what=what)
        if not isinstance(d, dict) or not {"pooled", "tokens", "mask"} <= d.keys() or not all(isinstance(d[k], torch.Tensor) for k in ("pooled", "tokens", "mask")):
            raise StaleItem(f"{p}: not a trunk-feature cache (no pooled / tokens / mask tensors)")
        n = [int(d[k].shape[0]) if d[k].dim() else -1 for k in ("pooled", "tokens", "mask")]
        if len(set(n)) != 1 or (rows is not None and n[0] != rows):
            raise StaleItem(f"{p}: a trunk-feature cache of {'/'.join(map(str, n))} entries (pooled/tokens/mask) where "
                            f"{rows if rows is not None else 'one count'} were expected")
        return Features(d["pooled"], d["tokens"], d["mask"])

    if compute is None:
        if path is None or not path.is_file():
            raise RsitrError(f"{path}: trunk-feature cache not found")
        f = load(path, "trunk-feature cache (delete it to recompute)")
        mark_used(path)
        return f
    return load_or_compute(path, "trunk-feature cache", load=load, compute=compute,
                           save=lambda f, tmp: torch.save({"pooled": f.pooled, "tokens": f.tokens, "mask": f.mask}, tmp),
                           describe=lambda f: description)


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


def select(f: Features, index: torch.Tensor, device: torch.device) -> Features:
    return Features(f.pooled[index].to(device), f.tokens[index].to(device).float(), f.mask[index].to(device))
