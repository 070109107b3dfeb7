"""Image loading for every pixel format remote-sensing archives ship (PIL + numpy, rasterio optional).

:func:`load_image` always returns an 8-bit ``RGB`` :class:`PIL.Image.Image`, the input of the
eval/train transforms. What happens per source format:

* ``RGB``: returned as is. ``CMYK``, ``YCbCr``, ``1``: converted by PIL.
* ``L`` (grey): the grey band is repeated three times (PIL's ``convert("RGB")``).
* ``P`` (palette): expanded through the palette (``RGBA`` first when the palette has transparency).
* ``RGBA`` / ``LA`` / ``PA``: ``alpha="drop"`` (default) ignores the alpha band — the same as
  ``Image.convert("RGB")`` and therefore as the CLIP/open_clip preprocessing; ``alpha="black"``
  composites on black (``rgb * a / 255``, rounded), which blanks no-data areas marked only by alpha.
* ``I;16*`` (16-bit), ``I`` (32-bit int), ``F`` (32-bit float), and TIFFs with more than 8 bits
  per sample or with more than 4 bands are read as arrays and scaled to 0-255 with ``stretch``:

  - ``"dtype"`` (default): by the range of the stored type. Unsigned integers: ``x / max * 255``
    (``uint16``: 65535). Signed integers: ``(x - min) / (max - min) * 255`` over the type range.
    32-bit ``I`` images whose values all lie in 0..65535 are treated as 16-bit (PIL opens 16-bit
    PNGs and TIFFs as ``I`` in some versions). Floats: ``[0, 1] -> [0, 255]`` when every finite
    value lies in [0, 1]; otherwise there is no meaningful type range and ``"minmax"`` is used
    (logged at debug level).
  - ``"minmax"``: per band, ``(x - min) / (max - min)`` over the band's finite values.
  - ``"p2-98"``: per band, the 2nd-98th percentile stretch with clipping — the usual display
    stretch for 12/16-bit satellite data whose values fill a small part of the type range.

  NaN/inf values become 0. 8-bit data is never stretched (``stretch`` only concerns data with
  more than 8 bits), so a mixed archive can be loaded with one setting.
* More than 3 bands (after alpha handling, e.g. a 4-band RGBN or 13-band Sentinel-2 TIFF):
  ``bands=None`` takes the first three bands; ``bands=(r, g, b)`` picks 0-based band indices
  (e.g. ``(3, 2, 1)`` for Sentinel-2 B4/B3/B2). A single-band image gives grey RGB.
  ``bands`` is also honoured for ordinary 3/4-band images.

PIL cannot read TIFFs with more than 4 samples per pixel and reads 16-bit RGB TIFFs as 8 bits;
those go through ``rasterio`` when it is installed. Otherwise a :class:`DataError` names the file.

EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo taken on its side is
encoded as it is shown, upright. Remote-sensing tiles carry no orientation tag, so for them (and
for the benchmarks) nothing changes.

Pixel limit: an image with more than :func:`max_pixels` pixels (default
:data:`DEFAULT_MAX_PIXELS`, ``rsitr --max-pixels N``) is refused from its header, before any
decoding, with :class:`ImageTooLarge` naming the file, its size and the limit. It replaces PIL's
own decompression-bomb check (switched off on import of this module: that check raised an
exception no caller expected, at a fixed 179 megapixels). Georeferenced rasters are read tile by
tile (:mod:`rsitr.search.sources`) and do not pass through here.

Every failure (missing file, unidentifiable bytes, truncated data, unsupported layout) raises
:class:`~rsitr.utils.errors.DataError` with the file name and the reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 400_000_000  # 20000 x 20000: generous for remote-sensing scenes, 1.2 GB as RGB
_limit = {"pixels": DEFAULT_MAX_PIXELS}
Image.MAX_IMAGE_PIXELS = None  # rsitr's own limit, checked from the header on every decode path below


class ImageTooLarge(DataError):
    """An image with more pixels than :func:`max_pixels` (refused before decoding)."""


def set_max_pixels(n: int) -> None:
    """Set the pixel limit of every plain-image decode (``rsitr --max-pixels``)."""
    if int(n) < 1:
        raise ValueError(f"max pixels must be >= 1, got {n}")
    _limit["pixels"] = int(n)


def max_pixels() -> int:
    """The current pixel limit (:func:`set_max_pixels`)."""
    return _limit["pixels"]


def check_pixels(path: str | os.PathLike, width: int, height: int) -> None:
    """Raise :class:`ImageTooLarge` naming ``path`` when ``width x height`` is over the limit."""
    limit = max_pixels()
    if int(width) * int(height) > limit:
        raise ImageTooLarge(f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), over the limit of "
                            f"{limit / 1e6:g} megapixels (rsitr --max-pixels N raises it)")

STRETCHES = ("dtype", "minmax", "p2-98")
ALPHA_MODES = ("drop", "black")
_TIFF_SUFFIXES = {".tif", ".tiff", ".gtif", ".gtiff"}


def rasterio_or_none():
    """The rasterio module (its GDAL logs quietened), or None when it is not installed."""
    from rsitr.utils.logging import quiet_library_logs

    quiet_library_logs()
    try:
        import rasterio  # noqa: F401

        return rasterio
    except ImportError:
        return None


# -- header ------------------------------------------------------------------------------------
def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image, reading only its header (PIL, else rasterio for TIFFs PIL
    cannot identify). Raises :class:`DataError` naming the file when neither can read it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        rio = rasterio_or_none()
        if rio is None or path.suffix.lower() not in _TIFF_SUFFIXES:
            raise DataError(f"{path}: unreadable image ({_reason(exc)})") from exc
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning for plain tiles
                with rio.open(path) as ds:
                    w, h = ds.width, ds.height
        except Exception as exc2:  # noqa: BLE001 - any driver failure means unreadable
            raise DataError(f"{path}: unreadable image (PIL: {_reason(exc)}; rasterio: {exc2})") from exc2
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: empty image size {w}x{h}")
    check_pixels(path, w, h)
    return int(w), int(h)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can identify"
    return f"{type(exc).__name__}: {exc}"


# -- scaling -----------------------------------------------------------------------------------
def to_uint8(arr: np.ndarray, stretch: str = "dtype") -> np.ndarray:
    """Scale an ``[H, W, C]`` (or ``[H, W]``) array of any numeric dtype to ``uint8`` (see the
    module docstring for the ``stretch`` rules). ``uint8`` input is returned unchanged."""
    if stretch not in STRETCHES:
        raise ValueError(f"stretch must be one of {STRETCHES}, got {stretch!r}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    squeeze = arr.ndim == 2
    a = arr[..., None] if squeeze else arr
    x = a.astype(np.float64)
    finite = np.isfinite(x)
    x = np.where(finite, x, np.nan)
    mode = stretch
    if mode == "dtype":
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            lo, hi = float(info.min), float(info.max)
            if arr.dtype == np.int32 or arr.dtype == np.int64:
                vmin = np.nanmin(x) if finite.any() else 0.0
                vmax = np.nanmax(x) if finite.any() else 0.0
                if vmin >= 0 and vmax <= 65535:  # 16-bit data opened as 32-bit "I"
                    lo, hi = 0.0, 65535.0
            out = (x - lo) / (hi - lo) * 255.0
        else:
            vals = x[finite]
            if vals.size == 0 or (vals.min() >= 0.0 and vals.max() <= 1.0):
                out = x * 255.0
            else:
                log.debug("float image with values in [%g, %g]: no type range, using min-max", vals.min(), vals.max())
                mode = "minmax"
    if mode in ("minmax", "p2-98"):
        out = np.empty_like(x)
        for c in range(x.shape[-1]):
            band = x[..., c]
            vals = band[np.isfinite(band)]
            if vals.size == 0:
                out[..., c] = 0.0
                continue
            if mode == "minmax":
                lo, hi = float(vals.min()), float(vals.max())
            else:
                lo, hi = (float(v) for v in np.percentile(vals, (2.0, 98.0)))
            out[..., c] = (band - lo) / (hi - lo) * 255.0 if hi > lo else 0.0
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    res = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return res[..., 0] if squeeze else res


def _select_bands(arr: np.ndarray, bands: Sequence[int] | None, path: Path) -> np.ndarray:
    """``[H, W, C]`` -> ``[H, W, 3]``: the given bands, the first three, or a repeated grey band."""
    c = arr.shape[-1]
    if bands is not None:
        bands = tuple(int(b) for b in bands)
        if len(bands) != 3:
            raise DataError(f"{path}: bands= must name exactly 3 bands (r, g, b), got {bands}")
        bad = [b for b in bands if not 0 <= b < c]
        if bad:
            raise DataError(f"{path}: bands={bands} out of range for an image with {c} band(s) (0-based indices)")
        return arr[..., list(bands)]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 2:  # grey + alpha handled earlier; two data bands: grey from the first
        return np.repeat(arr[..., :1], 3, axis=-1)
    return arr[..., :3]


# -- loading -----------------------------------------------------------------------------------
def load_image(
    path: str | os.PathLike,
    *,
    stretch: str = "dtype",
    bands: Sequence[int] | None = None,
    alpha: str = "drop",
) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image (see the module docstring for each format).

    stretch: ``"dtype"`` | ``"minmax"`` | ``"p2-98"`` for data with more than 8 bits per sample.
    bands:   three 0-based band indices to use as R, G, B (default: the first three).
    alpha:   ``"drop"`` (default, as ``convert("RGB")``) or ``"black"`` (composite on black).
    """
    if stretch not in STRETCHES:
        raise ValueError(f"stretch must be one of {STRETCHES}, got {stretch!r}")
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        im = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if path.suffix.lower() in _TIFF_SUFFIXES and rasterio_or_none() is not None:
            return _from_array(_read_rasterio(path, exc), path, stretch, bands, alpha="drop")
        hint = " (a multi-band TIFF? install rasterio to read it)" if path.suffix.lower() in _TIFF_SUFFIXES else ""
        raise DataError(f"{path}: unreadable image ({_reason(exc)}){hint}") from exc
    with im:
        check_pixels(path, *im.size)
        try:
            if _wants_rasterio(im) and rasterio_or_none() is not None:
                return _from_array(_read_rasterio(path, None), path, stretch, bands, alpha="drop")
            im.load()
            return _from_pil(_upright(im), path, stretch, bands, alpha)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: unreadable image ({_reason(exc)}; truncated or corrupt?)") from exc


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation tag says (itself when it has none)."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels as stored
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _wants_rasterio(im: Image.Image) -> bool:
    """TIFFs PIL would read lossily: more than 8 bits per sample in a multi-sample image."""
    if getattr(im, "format", None) != "TIFF":
        return False
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = int(tags.get(277, 1) or 1)
    return samples > 1 and max(int(b) for b in bits) > 8


def _read_rasterio(path: Path, pil_exc: BaseException | None) -> np.ndarray:
    """All bands of a raster as ``[H, W, C]`` in their stored dtype."""
    import warnings

    rio = rasterio_or_none()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning for plain tiles
            with rio.open(path) as ds:
                check_pixels(path, ds.width, ds.height)
                arr = ds.read()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver failure means unreadable
        pre = f"PIL: {_reason(pil_exc)}; " if pil_exc is not None else ""
        raise DataError(f"{path}: unreadable image ({pre}rasterio: {exc})") from exc
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{path}: raster has no pixels (shape {arr.shape})")
    return np.moveaxis(arr, 0, -1)


def _from_array(arr: np.ndarray, path: Path, stretch: str, bands: Sequence[int] | None, alpha: str) -> Image.Image:
    arr = _select_bands(arr, bands, path)
    return Image.fromarray(np.ascontiguousarray(to_uint8(arr, stretch)), "RGB")


def _composite_black(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    # round(rgb * a / 255) in integer arithmetic
    return ((rgb.astype(np.uint32) * a[..., None].astype(np.uint32) + 127) // 255).astype(np.uint8)


def _from_pil(im: Image.Image, path: Path, stretch: str, bands: Sequence[int] | None, alpha: str) -> Image.Image:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        if mode in ("RGBa", "La"):  # premultiplied: un-premultiply to the plain form first
            im = im.convert("RGBA" if mode == "RGBa" else "LA")
            mode = im.mode
        arr = np.asarray(im)
        color, a = arr[..., :-1], arr[..., -1]
        if alpha == "black":
            color = _composite_black(color, a)
        return _from_array(color, path, stretch, bands, alpha)
    if mode == "RGB":
        if bands is None:
            return im.copy()
        return _from_array(np.asarray(im), path, stretch, bands, alpha)
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        try:
            rgb = im.convert("RGB") if mode != "1" else im.convert("L").convert("RGB")
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot convert mode {mode} to RGB ({exc})") from exc
        if bands is None:
            return rgb
        if mode == "CMYK":  # bands then index C, M, Y, K as stored
            return _from_array(np.asarray(im), path, stretch, bands, alpha)
        return _from_array(np.asarray(rgb), path, stretch, bands, alpha)
    if mode.startswith("I;16") or mode in ("I", "F", "I;32", "F;32"):
        arr = np.asarray(im)
        if arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return _from_array(arr[..., None], path, stretch, bands, alpha)
    try:  # anything else PIL knows how to make RGB from
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unsupported pixel mode {mode!r} ({exc})") from exc
