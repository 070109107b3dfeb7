"""Whole-scene facts of a georeferenced raster: ground pixel size, windows in metres, no-data, stretch.

A scene (a raster rasterio opens with a non-identity transform) is read here in three ways:

* **ground size**: :func:`ground_pixel_size` measures how many metres on the ground one pixel step
  covers, along a row and along a column, at a given pixel. The pixel's neighbours are
  transformed to WGS84 longitude/latitude (:func:`rasterio.warp.transform`) and the step is
  measured on the WGS84 ellipsoid (meridian and prime-vertical radii of curvature at that
  latitude). This one rule covers every CRS: projected ones in any linear unit (metre, US survey
  foot...: the unit factor is part of the transform to WGS84), geographic ones in degrees (the
  metres per degree of longitude shrink with the latitude, so tiles are measured per tile row),
  and the scale error of conformal projections (a Web-Mercator "metre" at 35 degrees N is 0.82 m
  on the ground; ``crs.linear_units_factor`` alone would make such tiles 22 % too small).
* **windows in metres**: :func:`metre_windows` cuts the scene into tiles of ``M`` metres on the
  ground (``overlap_m`` metres shared by neighbours), laid out row by row from the top like the
  pixel tiling (:func:`rsitr.search.sources.tile_offsets`: the last row/column is flush with the
  scene's edge). Windows are whole pixels, so a tile's ground size is ``M`` within half a pixel.
  A scene smaller than a tile (in either direction) gives a tile clipped to the scene there.
* **statistics of the whole scene**, each computed once per scene and process (cached on path,
  size and modification time): :func:`validity_grid`, the valid-pixel mask on a decimated grid
  (a pixel is no-data when any used band is masked - nodata value, alpha band, internal mask -
  or not finite), from which :func:`valid_fraction` tells a window's valid share; and
  :func:`scene_render`, the bands used for RGB and, for data with more than 8 bits, the
  2nd-98th percentile stretch of each band over the valid pixels of a decimated read of the
  whole scene - one stretch per scene, so neighbouring tiles look alike.

Band rule (:func:`rgb_bands`): the bands whose colour interpretation is red, green and blue when
all three are tagged, else the first three; one or two bands: grey from the first (a palette
band through its colour map).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rsitr.utils.errors import DataError

WGS84_A = 6378137.0  # semi-major axis, metres
WGS84_F = 1.0 / 298.257223563
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)
STATS_PX = 1024  # long side of the decimated read the per-scene stretch is computed on
GRID_MAX_PX = 4096  # long side cap of the validity grid
CELLS_PER_TILE = 8  # validity grid cells along the side of the smallest tile (at least)


def metres_per_degree(lat: float) -> tuple[float, float]:
    """``(metres per degree of longitude, metres per degree of latitude)`` at ``lat`` on WGS84."""
    phi = math.radians(lat)
    w = 1.0 - WGS84_E2 * math.sin(phi) ** 2
    n = WGS84_A / math.sqrt(w)  # prime vertical radius of curvature
    m = WGS84_A * (1.0 - WGS84_E2) / w ** 1.5  # meridional radius of curvature
    return math.radians(1.0) * n * math.cos(phi), math.radians(1.0) * m


def ground_distance(lon0: float, lat0: float, lon1: float, lat1: float) -> float:
    """Metres between two nearby WGS84 points (local ellipsoidal metric at their mid-latitude;
    exact to second order in the distance, i.e. far below a pixel over a tile's extent)."""
    dlon = (lon1 - lon0 + 180.0) % 360.0 - 180.0
    kx, ky = metres_per_degree((lat0 + lat1) / 2.0)
    return math.hypot(dlon * kx, (lat1 - lat0) * ky)


def ground_pixel_size(ds, col: float, row: float, span: float = 16.0) -> tuple[float, float]:
    """Metres on the ground of one pixel step along a row (x) and along a column (y) of the open
    raster ``ds`` at pixel ``(col, row)`` (measured over ``span`` pixels)."""
    from rasterio.warp import transform

    t = ds.transform
    pts = [(t.c + t.a * c + t.b * r, t.f + t.d * c + t.e * r) for c, r in ((col, row), (col + span, row), (col, row + span))]
    lon, lat = transform(ds.crs, "EPSG:4326", [p[0] for p in pts], [p[1] for p in pts])
    if not all(math.isfinite(v) for v in (*lon, *lat)) or any(abs(v) > 90.0 for v in lat):
        raise DataError(f"{ds.name}: pixel ({col:.0f}, {row:.0f}) has no place on the globe in its CRS (latitude outside +-90)")
    mx = ground_distance(lon[0], lat[0], lon[1], lat[1]) / span
    my = ground_distance(lon[0], lat[0], lon[2], lat[2]) / span
    if not (mx > 0 and my > 0):
        raise DataError(f"{ds.name}: degenerate pixel size at ({col:.0f}, {row:.0f})")
    return mx, my


@dataclass(frozen=True)
class MetreWindow:
    """A tile of ``scale_m`` metres: the pixel window ``[col, row, width, height]`` and the size
    ``out`` = ``[width, height]`` it is read at (the model's input size for a full tile; less for
    a tile clipped by the scene's edge, at the same ground sampling)."""

    window: tuple[int, int, int, int]
    out: tuple[int, int]
    clipped: bool


def _offsets(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    offs = list(range(0, length - tile + 1, stride))
    if offs[-1] + tile < length:
        offs.append(length - tile)
    return offs


def metre_windows(ds, scale_m: float, overlap_m: float, out_px: int) -> list[MetreWindow]:
    """Row-major windows of ``scale_m`` metres (see the module doc) over the open raster ``ds``,
    each to be read at ``out_px`` pixels a side."""
    W, H = ds.width, ds.height
    cx = W / 2.0
    stride_m = scale_m - overlap_m
    rows: list[tuple[int, int, int, float]] = []  # (row offset, height, unclipped height, metres per pixel along x there)
    r = 0
    while True:
        _, my = ground_pixel_size(ds, cx, min(r, H - 1))
        h0 = scale_m / my
        mx, my = ground_pixel_size(ds, cx, min(r + h0 / 2.0, H - 1))  # at the tile row's middle
        h = max(1, round(scale_m / my))
        if r + h >= H:
            last = max(0, H - h)
            if not rows or last > rows[-1][0]:
                rows.append((last, min(h, H), h, mx))
            break
        rows.append((r, h, h, mx))
        r += max(1, round(stride_m / my))
    out: list[MetreWindow] = []
    for row, h, full_h, mx in rows:
        w = max(1, round(scale_m / mx))
        stride = max(1, round(stride_m / mx))
        oh = max(1, round(out_px * min(1.0, h / max(full_h, 1))))
        for col in _offsets(W, w, stride):
            ww = min(w, W - col)
            ow = max(1, round(out_px * ww / w))
            out.append(MetreWindow((col, row, ww, h), (ow, oh), clipped=ww < w or h < full_h))
    return out


# -- per-scene statistics ---------------------------------------------------------------------------
def _file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path)), st.st_mtime_ns, st.st_size


def rgb_bands(ds) -> list[int]:
    """1-based band indexes rendered as RGB (see the module doc)."""
    from rasterio.enums import ColorInterp

    if ds.count >= 3:
        ci = list(ds.colorinterp)
        tagged = [ci.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue) if c in ci]
        return tagged if len(tagged) == 3 else [1, 2, 3]
    return [1]


def decimated_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``(h, w)`` with the long side at most ``long_side``, the aspect ratio kept."""
    f = max(height, width) / float(long_side)
    if f <= 1.0:
        return height, width
    return max(1, round(height / f)), max(1, round(width / f))


def valid_of(arr: np.ma.MaskedArray) -> np.ndarray:
    """``[bands, h, w]`` masked read -> ``[h, w]`` bool: valid where no band is masked or non-finite."""
    valid = ~np.ma.getmaskarray(arr).any(axis=0)
    data = np.ma.getdata(arr)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    return valid


@dataclass(frozen=True)
class SceneRender:
    """How a scene's pixels become 8-bit RGB: ``bands`` (1-based), the palette's lookup table for a
    palette band (else None), and per band the stretch ``lo``/``hi`` (None for 8-bit data)."""

    bands: tuple[int, ...]
    lut: np.ndarray | None
    lo: tuple[float, ...] | None
    hi: tuple[float, ...] | None

    def to_rgb(self, arr: np.ma.MaskedArray) -> np.ndarray:
        """A masked ``[bands, h, w]`` read of ``bands`` -> ``uint8 [h, w, 3]``, no-data black."""
        valid = valid_of(arr)
        data = np.ma.getdata(arr)
        if self.lut is not None:
            rgb = self.lut[np.clip(data[0], 0, 255).astype(np.uint8)]
        elif self.lo is None:
            rgb = np.moveaxis(data, 0, -1).astype(np.uint8, copy=False)
        else:
            x = np.moveaxis(data, 0, -1).astype(np.float64)
            lo, hi = np.asarray(self.lo), np.asarray(self.hi)
            span = np.where(hi > lo, hi - lo, np.inf)
            x = np.nan_to_num((x - lo) / span * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
            rgb = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)
        return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def scene_render(path: str | os.PathLike) -> SceneRender:
    """The :class:`SceneRender` of the raster at ``path`` (computed once per file version)."""
    return _scene_render(*_file_key(path))


@functools.lru_cache(maxsize=64)
def _scene_render(path: str, _mtime: int, _size: int) -> SceneRender:
    import rasterio
    from rasterio.enums import ColorInterp, Resampling

    try:
        with rasterio.open(path) as ds:
            if ds.count == 0:
                raise DataError(f"{path}: raster has no bands")
            bands = rgb_bands(ds)
            if ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette:
                lut = np.zeros((256, 3), np.uint8)
                for k, v in ds.colormap(1).items():
                    if 0 <= k < 256:
                        lut[k] = v[:3]
                return SceneRender(tuple(bands), lut, None, None)
            if ds.dtypes[bands[0] - 1] == "uint8":
                return SceneRender(tuple(bands), None, None, None)
            shape = decimated_shape(ds.height, ds.width, STATS_PX)
            arr = ds.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest, masked=True)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver failure means unreadable
        raise DataError(f"{path}: cannot read the scene ({exc})") from exc
    valid = valid_of(arr)
    data = np.ma.getdata(arr).astype(np.float64)
    lo, hi = [], []
    for b in range(data.shape[0]):
        vals = data[b][valid]
        if vals.size == 0:
            lo.append(0.0)
            hi.append(0.0)
            continue
        p2, p98 = np.percentile(vals, (2.0, 98.0))
        lo.append(float(p2))
        hi.append(float(p98))
    return SceneRender(tuple(bands), None, tuple(lo), tuple(hi))


@dataclass(frozen=True)
class ValidityGrid:
    """The valid-pixel mask of a scene of ``height`` x ``width`` pixels on a ``grid.shape`` grid."""

    height: int
    width: int
    grid: np.ndarray  # bool [gh, gw]
    # bool [gh, gw]: valid cells that are exactly 0 in every used band (None: not measured). A raster
    # that declares no no-data can still have black fill around its footprint; this lets the
    # tiler say so instead of indexing the fill as imagery in silence
    black: np.ndarray | None = None
    declared: bool = True  # the raster declares no-data somehow (nodata value, alpha, mask, float NaN)

    def _cells(self, grid: np.ndarray, window) -> np.ndarray:
        col, row, w, h = window
        gh, gw = grid.shape
        r0, r1 = int(row * gh // self.height), int(math.ceil((row + h) * gh / self.height))
        c0, c1 = int(col * gw // self.width), int(math.ceil((col + w) * gw / self.width))
        return grid[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)]

    def fraction(self, window) -> float:
        """Valid share of the pixel window ``[col, row, width, height]`` (cells it touches)."""
        cells = self._cells(self.grid, window)
        return float(cells.mean()) if cells.size else 0.0

    def black_as_nodata(self) -> "ValidityGrid":
        """This grid with its pure black cells counted as no-data (``--black-nodata``), the user then
        declaring what the raster does not; a grid whose raster declares its no-data is returned as is."""
        if self.declared or self.black is None:
            return self
        return replace(self, grid=self.grid & ~self.black, black=None, declared=True)

    def black_fraction(self, window) -> float:
        """Share of the window's cells that are valid but pure black (0 in every used band)."""
        if self.black is None:
            return 0.0
        cells = self._cells(self.black, window)
        return float(cells.mean()) if cells.size else 0.0


def validity_grid(ds, min_tile_px: int) -> ValidityGrid:
    """The scene's :class:`ValidityGrid`, fine enough that the smallest tile (``min_tile_px`` pixels
    a side) spans :data:`CELLS_PER_TILE` cells (capped at :data:`GRID_MAX_PX` a side)."""
    return _validity_grid(*_file_key(ds.name), max(1, int(min_tile_px)))


@functools.lru_cache(maxsize=16)
def _validity_grid(path: str, _mtime: int, _size: int, min_tile_px: int) -> ValidityGrid:
    import rasterio
    from rasterio.enums import MaskFlags, Resampling

    with rasterio.open(path) as ds:
        f = max(1.0, min_tile_px / CELLS_PER_TILE)
        long_side = min(max(ds.height, ds.width), max(1, int(math.ceil(max(ds.height, ds.width) / f))), GRID_MAX_PX)
        shape = decimated_shape(ds.height, ds.width, long_side)
        bands = rgb_bands(ds)
        masks = ds.read_masks(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
        valid = (masks > 0).all(axis=0)
        floating = any(np.issubdtype(np.dtype(ds.dtypes[b - 1]), np.floating) for b in bands)
        declared = floating or any(flag != MaskFlags.all_valid for b in bands for flag in ds.mask_flag_enums[b - 1])
        if declared and not floating:  # the pixels are needed only for NaNs or undeclared black fill
            return ValidityGrid(ds.height, ds.width, valid, declared=True)
        data = ds.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
        if floating:
            valid &= np.isfinite(data).all(axis=0)
        return ValidityGrid(ds.height, ds.width, valid, black=None if declared else valid & (data == 0).all(axis=0), declared=declared)


def quicklook(path: str | os.PathLike, long_side: int = 1024):
    """A downsampled RGB render of the whole scene (PIL image, long side <= ``long_side``) with the
    scene's own stretch; returns ``(image, scale)`` with ``scale`` = quicklook px per scene px."""
    import rasterio
    from PIL import Image
    from rasterio.enums import Resampling

    render = scene_render(path)
    try:
        with rasterio.open(path) as ds:
            shape = decimated_shape(ds.height, ds.width, long_side)
            resampling = Resampling.nearest if render.lut is not None else Resampling.average
            arr = ds.read(list(render.bands), out_shape=(len(render.bands), *shape), resampling=resampling, masked=True)
            scale = shape[1] / ds.width
    except Exception as exc:  # noqa: BLE001 - any driver failure means unreadable
        raise DataError(f"{path}: cannot read the scene ({exc})") from exc
    return Image.fromarray(np.ascontiguousarray(render.to_rgb(arr)), "RGB"), scale
