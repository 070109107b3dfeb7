"""What gets indexed: image folders and GeoTIFF scenes, cut into items.

:func:`scan_source` walks a file or folder (recursively, sorted, hidden entries skipped) and
returns one :class:`Item` per searchable unit:

* a **georeferenced raster** (a TIFF that rasterio opens with a CRS and a non-identity
  transform) is cut into ``tile_size`` x ``tile_size`` pixel windows with ``overlap`` pixels
  shared between neighbours (stride ``tile_size - overlap``). The last column/row of tiles is
  aligned to the raster's right/bottom edge so every tile is full size and nothing is left out
  (the last tile then overlaps its neighbour more); a raster smaller than a tile is one item of
  its own size. Each tile keeps its bounds in the raster CRS, the CRS, and its footprint in WGS84
  (:func:`rsitr.search.geo.to_wgs84`);
* **any other image** (jpg/png/bmp/webp, a plain TIFF) is one whole-image item without geo
  fields.

:func:`read_item` renders an item as 8-bit RGB: 1 band -> grey RGB (a palette band through its
colour map), 2 bands -> grey from the first, more than 3 -> the first three; data with more than
8 bits is rescaled per item (tile) with the 2nd-98th percentile stretch of its valid pixels
(:func:`rsitr.data.images.to_uint8`, ``"p2-98"``); nodata / masked pixels are excluded from the
percentiles and drawn black. Whole images go through :func:`rsitr.data.images.load_image` with
the same stretch.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from rsitr.data.images import rasterio_or_none
from rsitr.utils.errors import DataError, RsitrError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gtif", ".gtiff"}
TIFF_SUFFIXES = {".tif", ".tiff", ".gtif", ".gtiff"}
STRETCH = "p2-98"  # per-tile display stretch of >8-bit data (recorded in the manifest)


@dataclass
class Item:
    """One searchable unit. ``window`` = ``[col_off, row_off, width, height]`` in pixels of the
    source raster (None: the whole image); ``bounds`` = ``[left, bottom, right, top]`` in ``crs``;
    ``wgs84`` = ``[west, south, east, north]`` in EPSG:4326."""

    key: str
    path: str
    window: list[int] | None = None
    bounds: list[float] | None = None
    crs: str | None = None
    wgs84: list[float] | None = None
    id: int = -1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Item":
        return cls(**{k: d.get(k) for k in ("key", "path", "window", "bounds", "crs", "wgs84")}, id=int(d.get("id", -1)),
                   extra=dict(d.get("extra") or {}))


def item_key(path: Path, window: list[int] | None) -> str:
    return str(path) if window is None else f"{path}#{window[0]},{window[1]},{window[2]},{window[3]}"


def iter_image_files(source: str | os.PathLike) -> Iterator[Path]:
    src = Path(source)
    if src.is_file():
        yield src.resolve()
        return
    if not src.is_dir():
        raise RsitrError(f"{source}: no such file or folder to index")
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if not name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                yield p.resolve()


def tile_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``tile - overlap``, last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    offs = list(range(0, length - tile + 1, stride))
    if offs[-1] + tile < length:
        offs.append(length - tile)
    return offs


def _georeferenced(ds, path: Path | None = None) -> bool:
    if ds.crs is None and not ds.transform.is_identity and path is not None:
        log.warning("%s: has a geotransform but no CRS: indexed as a plain image, without map coordinates "
                    "(assign a CRS, e.g. gdal_edit.py -a_srs EPSG:XXXX, to tile it in ground units)", path)
    return ds.crs is not None and not ds.transform.is_identity


def scan_file(path: Path, tile_size: int = 256, overlap: int = 0) -> list[Item]:
    """Items of one file (tiles of a georeferenced raster, else the whole image)."""
    rio = rasterio_or_none()
    if path.suffix.lower() in TIFF_SUFFIXES and rio is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning
                with rio.open(path) as ds:
                    if _georeferenced(ds, path):
                        return _tiles(ds, path, tile_size, overlap)
        except rio.errors.RasterioIOError:
            pass  # not a raster GDAL reads: PIL gets its chance below
    from rsitr.data.images import image_size

    image_size(path)  # header check: raises DataError naming the file
    return [Item(key=item_key(path, None), path=str(path))]


def _tiles(ds, path: Path, tile: int, overlap: int) -> list[Item]:
    from rasterio.windows import Window, bounds as window_bounds

    from rsitr.search.geo import crs_string, to_wgs84

    crs = crs_string(ds.crs)
    items = []
    for row in tile_offsets(ds.height, tile, overlap):
        for col in tile_offsets(ds.width, tile, overlap):
            w, h = min(tile, ds.width - col), min(tile, ds.height - row)
            win = [col, row, w, h]
            b = window_bounds(Window(col, row, w, h), ds.transform)  # (left, bottom, right, top)
            bounds = [float(b[0]), float(b[1]), float(b[2]), float(b[3])]
            items.append(Item(key=item_key(path, win), path=str(path), window=win, bounds=bounds, crs=crs, wgs84=to_wgs84(bounds, ds.crs)))
    _clamp_latitudes(items, path)
    return items


def _clamp_latitudes(items: list[Item], path: Path) -> None:
    """Footprints reaching beyond the poles (a wrong CRS or geotransform) are clamped to +-90
    degrees, with one warning per file: they would otherwise be stored as impossible boxes."""
    bad = [it for it in items if it.wgs84 and not (-90.0 <= it.wgs84[1] <= 90.0 and -90.0 <= it.wgs84[3] <= 90.0)]
    if not bad:
        return
    lats = [v for it in bad for v in (it.wgs84[1], it.wgs84[3])]
    log.warning("%s: footprint latitudes reach %.4g..%.4g, beyond +-90 degrees (wrong CRS or geotransform?): "
                "%d tile footprint(s) clamped to the poles", path, min(lats), max(lats), len(bad))
    for it in bad:
        w, s, e, n = it.wgs84
        it.wgs84 = [w, min(max(s, -90.0), 90.0), e, min(max(n, -90.0), 90.0)]


def scan_source(source: str | os.PathLike, tile_size: int = 256, overlap: int = 0, *, skip_bad: bool = False) -> list[Item]:
    """Every item under ``source`` in a deterministic order (sorted paths, tiles row-major)."""
    if tile_size < 1:
        raise RsitrError(f"--tile-size must be >= 1, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise RsitrError(f"--overlap must be in [0, tile size {tile_size}), got {overlap}")
    from rsitr.data.images import ImageTooLarge

    items: list[Item] = []
    skipped = {"over the pixel limit": 0, "unreadable": 0}
    for path in iter_image_files(source):
        try:
            items.extend(scan_file(path, tile_size, overlap))
        except DataError as exc:
            if not skip_bad:
                raise
            skipped["over the pixel limit" if isinstance(exc, ImageTooLarge) else "unreadable"] += 1
            log.warning("skipped: %s", exc)
    if any(skipped.values()):
        log.warning("--skip-bad: skipped %d file(s) of %s: %s", sum(skipped.values()), source,
                    ", ".join(f"{n} {why}" for why, n in skipped.items() if n))
    return items


_warned_nodata: set[str] = set()  # files whose all-no-data tiles were reported (once per file)


# -- pixels -------------------------------------------------------------------------------------
def read_item(item: Item) -> Image.Image:
    """The item's pixels as an 8-bit RGB PIL image (see the module doc for band/bit handling)."""
    path = Path(item.path)
    if item.window is None:
        from rsitr.data.images import load_image

        return load_image(path, stretch=STRETCH)
    rio = rasterio_or_none()
    if rio is None:
        raise RsitrError(f"{path}: reading GeoTIFF tiles needs rasterio (pip install 'rsitr[geo]')")
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window

    col, row, w, h = item.window
    try:
        with rio.open(path) as ds:
            if ds.count == 0:
                raise DataError(f"{path}: raster has no bands")
            palette = ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette
            idx = [1, 2, 3] if ds.count >= 3 else [1]
            arr = ds.read(idx, window=Window(col, row, w, h), masked=True)
            cmap = ds.colormap(1) if palette else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver failure means unreadable
        raise DataError(f"{path}: cannot read tile {item.window} ({exc})") from exc
    valid = ~np.ma.getmaskarray(arr).any(axis=0)  # [h, w]: a pixel is nodata if any band is
    if np.issubdtype(arr.dtype, np.floating):  # NaN is no-data in float rasters even when not declared
        valid &= np.isfinite(np.ma.getdata(arr)).all(axis=0)
    if not valid.any() and str(path) not in _warned_nodata:
        _warned_nodata.add(str(path))
        log.warning("%s: tile %s is all no-data (NaN or the declared nodata value): indexed as a black tile "
                    "(said once per file)", path, item.window)
    data = np.moveaxis(np.ma.getdata(arr), 0, -1)  # [h, w, c]
    if cmap is not None:
        lut = np.zeros((256, 3), np.uint8)
        for k, v in cmap.items():
            if 0 <= k < 256:
                lut[k] = v[:3]
        rgb = lut[data[..., 0].astype(np.uint8)]
    elif data.dtype == np.uint8:
        rgb = data
    else:
        from rsitr.data.images import to_uint8

        x = data.astype(np.float64)
        x[~valid] = np.nan
        rgb = to_uint8(x, STRETCH)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    rgb = np.where(valid[..., None], rgb, 0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
