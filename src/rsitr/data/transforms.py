"""Image transforms without torchvision (PIL + numpy + torch).

:class:`EvalTransform` reproduces the CLIP eval preprocessing as open_clip builds it from
torchvision (``Resize(S, bicubic)`` -> ``CenterCrop(S)`` -> RGB -> ``ToTensor`` -> ``Normalize``),
down to torchvision's rounding rules, so features match the reference implementation:

* ``Resize(S)`` on the shorter side: the short side becomes ``S`` and the long side
  ``int(S * long / short)`` (truncation, torchvision ``_compute_resized_output_size``); PIL does
  the resampling (``Image.resize``), as torchvision does for PIL input. No resize when the size
  is unchanged.
* ``CenterCrop(S)``: zero padding when the image is smaller than ``S`` (left/top get
  ``(S - w) // 2``, right/bottom ``(S - w + 1) // 2``), then ``top = int(round((h - S) / 2.0))``,
  ``left = int(round((w - S) / 2.0))`` with Python's round (half to even).
* ``ToTensor``: ``uint8 -> float32 / 255``; ``Normalize``: ``(x - mean) / std`` in float32.

``resize_mode="squash"`` resizes both sides to ``S`` (no crop), as open_clip's squash mode.

:class:`TrainTransform` is torchvision's ``RandomResizedCrop`` (same sampling procedure: 10
attempts of area / log-aspect-ratio sampling, then the central-crop fallback; crop then resize)
followed by random horizontal/vertical flips and 90-degree rotations — overhead imagery has no
canonical "up" — and an optional simple colour jitter. Randomness comes only from a
``numpy.random.Generator`` passed to ``__call__`` (or the transform's own, seeded one), never from
global RNG state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PreprocessConfig:
    """Eval-time preprocessing: resize shorter side to ``image_size`` (``interpolation``),
    center-crop ``image_size``, scale to [0, 1], normalise with ``mean``/``std``."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # "shortest" (CLIP: resize short side then center crop) or "squash"


_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


def resample_of(name: str) -> int:
    try:
        return _RESAMPLE[name.lower()]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {name!r}") from None


def shortest_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output ``(w, h)``: short side -> size, long side truncated."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` on a PIL image (zero padding when too small)."""
    w, h = img.size
    if size > w or size > h:
        pad_l = (size - w) // 2 if size > w else 0
        pad_t = (size - h) // 2 if size > h else 0
        pad_r = (size - w + 1) // 2 if size > w else 0
        pad_b = (size - h + 1) // 2 if size > h else 0
        canvas = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        w, h = img.size
        if w == size and h == size:
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor_normalized(arr: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[H, W, 3] uint8`` -> ``[3, H, W] float32``: ``/255`` then ``(x - mean) / std`` (ToTensor +
    Normalize, in the same float32 operations)."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # arrays viewing PIL memory are read-only; torch wants writable
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div(255)
    return t.sub_(mean).div_(std)


def _rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


DIHEDRAL_VIEWS = (1, 4, 8)


def dihedral_views(px: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first ``n`` (1, 4 or 8) symmetries of the square applied to a batch ``[B, C, S, S]``:
    identity, then the rotations by 90, 180 and 270 degrees (``n >= 4``), then each of the four
    mirrored left-right (``n == 8``). Aerial and satellite tiles have no "up", so a tile's
    embedding averaged over these views (test-time augmentation) is a better estimate of what it
    shows; the views are made on the already resized tensor, so they cost no decode."""
    if n not in DIHEDRAL_VIEWS:
        raise ValueError(f"test-time views must be one of {DIHEDRAL_VIEWS}, got {n}")
    if n > 1 and px.shape[-1] != px.shape[-2]:
        raise ValueError(f"dihedral views need square inputs, got {tuple(px.shape[-2:])}")
    views = [px] + ([torch.rot90(px, k, dims=(-2, -1)) for k in (1, 2, 3)] if n >= 4 else [])
    if n == 8:
        views += [torch.flip(v, dims=(-1,)) for v in views]
    return views


class EvalTransform:
    """PIL image -> normalised ``float32`` tensor ``[3, S, S]`` (CLIP eval preprocessing)."""

    def __init__(self, cfg: PreprocessConfig):
        if cfg.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {cfg.resize_mode!r}")
        self.cfg = cfg
        self.size = int(cfg.image_size)
        self.resample = resample_of(cfg.interpolation)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part (PIL in, PIL out), before tensor conversion."""
        s = self.size
        if self.cfg.resize_mode == "squash":
            return img if img.size == (s, s) else img.resize((s, s), self.resample)
        new = shortest_side_size(*img.size, s)
        if new != img.size:
            img = img.resize(new, self.resample)
        return center_crop(img, s)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_tensor_normalized(_rgb_array(self.resize_crop(img)), self.mean, self.std)

    def __repr__(self) -> str:
        c = self.cfg
        return f"EvalTransform(size={c.image_size}, mode={c.resize_mode}, interpolation={c.interpolation})"


def random_resized_crop_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` sampled as torchvision's ``RandomResizedCrop.get_params``: up to 10
    tries of a target area ``U(scale) * area`` and aspect ratio ``exp(U(log ratio))``; the first
    crop that fits is placed uniformly; else the central crop clamped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Training augmentation: RandomResizedCrop(S) + flips + 90-degree rotations (+ jitter).

    ``__call__(img, rng=None)``: pass a ``numpy.random.Generator`` for reproducible draws per
    sample (what the training loop does: one generator seeded by (seed, epoch, position)); without
    one the transform uses its own generator seeded with ``seed`` (state is per instance, so
    DataLoader worker copies would repeat draws — pass ``rng`` there).

    Draw order per call: crop parameters, hflip, vflip, rotation, jitter factors (fixed, so a
    given generator state always gives the same augmentation).

    ``color_jitter=c > 0``: brightness, contrast and saturation factors each ``U(1 - c, 1 + c)``,
    applied in that order on ``[0, 1]`` floats and clipped — a simple jitter, not torchvision's
    ``ColorJitter`` (no hue, no random order).
    """

    def __init__(
        self,
        cfg: PreprocessConfig,
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.5,
        rot90: bool = True,
        color_jitter: float = 0.0,
        seed: int | None = None,
    ):
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.cfg = cfg
        self.size = int(cfg.image_size)
        self.resample = resample_of(cfg.interpolation)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip, self.vflip, self.rot90 = float(hflip), float(vflip), bool(rot90)
        self.color_jitter = float(color_jitter)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
        self._rng = np.random.default_rng(seed)

    def augment(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """The augmented ``[S, S, 3] uint8`` array (before normalisation)."""
        rng = self._rng if rng is None else rng
        w, h = img.size
        top, left, ch, cw = random_resized_crop_params(w, h, self.scale, self.ratio, rng)
        crop = img.crop((left, top, left + cw, top + ch))  # crop then resize, as torchvision does
        s = self.size
        if crop.size != (s, s):
            crop = crop.resize((s, s), self.resample)
        arr = _rgb_array(crop)
        if self.hflip > 0 and rng.random() < self.hflip:
            arr = arr[:, ::-1]
        if self.vflip > 0 and rng.random() < self.vflip:
            arr = arr[::-1]
        if self.rot90:
            k = int(rng.integers(4))
            if k:
                arr = np.rot90(arr, k, axes=(0, 1))
        if self.color_jitter > 0:
            c = self.color_jitter
            b, ct, sat = rng.uniform(1 - c, 1 + c, size=3)
            x = arr.astype(np.float32) / 255.0
            x = x * b
            grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            x = (x - grey.mean()) * ct + grey.mean()
            grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
            x = grey + (x - grey) * sat
            arr = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return to_tensor_normalized(self.augment(img, rng), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"vflip={self.vflip}, rot90={self.rot90}, color_jitter={self.color_jitter})")


def batch_collate(items: Sequence[Any]) -> Any:
    """Stack a list of samples: tensors -> ``[B, ...]``; tuples/lists -> a tuple of collated
    columns (tensor columns stacked, anything else kept as a list)."""
    if not items:
        raise ValueError("batch_collate: empty batch")
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, (tuple, list)):
        cols = list(zip(*items))
        return tuple(torch.stack(list(c)) if isinstance(c[0], torch.Tensor) else list(c) for c in cols)
    return list(items)
