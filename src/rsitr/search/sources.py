"""What gets indexed: image folders and GeoTIFF scenes, cut into items.

:func:`scan_source` walks a file or folder (recursively, sorted, hidden entries skipped) and
returns one :class:`Item` per searchable unit, cut as a :class:`Tiling` says:

* a **georeferenced raster** (a TIFF that rasterio opens with a CRS and a non-identity
  transform) is cut either in **tiles of M metres on the ground** (``Tiling.meters``: one or
  several scales, windows measured on the WGS84 ellipsoid per tile row, each read resampled
  straight to the model's input size; :mod:`rsitr.search.scenes`) or in ``tile_size`` x
  ``tile_size`` **pixel** windows with ``overlap`` pixels shared between neighbours (stride
  ``tile_size - overlap``). Either way the last column/row of tiles is aligned to the raster's
  right/bottom edge so nothing is left out (the last tile then overlaps its neighbour more); a
  raster smaller than a tile is one item of its own size (a metre tile says so: ``extra``
  ``whole_scene``). Each tile keeps its bounds in the raster CRS, the CRS, and its footprint in
  WGS84 (:func:`rsitr.search.geo.to_wgs84`); metre tiles also record ``extra["scale_m"]`` (their
  ground size) and ``extra["px"]`` (the ``[width, height]`` they are read at). Tiles whose
  no-data share (nodata value, alpha 0, internal mask, NaN) exceeds ``Tiling.max_nodata`` are
  skipped and counted; a raster with no valid pixel is skipped with a warning; a raster whose
  extent leaves the globe (latitude outside +-90) is an error naming it;
* a TIFF with a transform but **no CRS** is cut in pixel tiles, with a warning (no footprints);
* **any other image** (jpg/png/bmp/webp, a plain TIFF) is one whole-image item without geo
  fields.

:func:`read_item` renders an item as 8-bit RGB with its scene's :class:`~rsitr.search.scenes.SceneRender`:
1 band -> grey RGB (a palette band through its colour map), 2 bands -> grey from the first,
3 or more -> the bands tagged red/green/blue, else the first three; data with more than 8 bits
is stretched **per scene** (2nd-98th percentile of each band over the valid pixels of a decimated
read of the whole raster), so neighbouring tiles look alike; no-data pixels are drawn black.
Whole images go through :func:`rsitr.data.images.load_image` with the percentile stretch of the
whole image.
"""
from __future__ import annotations

import logging
import math
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
STRETCH = "p2-98"  # display stretch of >8-bit data: of each whole image, of each scene for tiles (recorded in the manifest)
MAX_NODATA = 0.5  # default: tiles with more no-data than this share are skipped


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


# a metre tile narrower than this many source pixels (a 80 m tile of a 10 m scene: 8 px) shows the model
# nothing it can read: such a scale is left out for that raster, and a raster too coarse for every
# requested scale gets one scale of this many pixels
MIN_TILE_PX = 24


@dataclass
class Tiling:
    """How georeferenced rasters are cut (recorded in the index manifest, reused by ``index add``).

    ``meters`` None: pixel tiles of ``tile_size`` px sharing ``overlap`` px. ``meters`` set: tiles
    of each of those ground sizes (one index over several scales; each item records its
    ``scale_m``), neighbours sharing ``overlap_m`` metres, each read resampled straight to
    ``out_px`` pixels a side (the model's input size; :mod:`rsitr.search.scenes`). Rasters with a
    transform but no CRS are cut in pixel tiles either way (no ground size, no footprint).
    ``max_nodata``: tiles whose no-data share (nodata value, alpha 0, internal mask, NaN) exceeds
    it are skipped and counted (None: none skipped). ``black_nodata``: in rasters that declare no
    no-data, pixels that are 0 in every band count as no-data too (black fill around a footprint;
    what ``gdal_edit.py -a_nodata 0`` would declare, without editing the file). ``why`` says in log
    lines why this tiling was chosen (not recorded)."""

    tile_size: int = 256
    overlap: int = 0
    meters: tuple[float, ...] | None = None
    overlap_m: float = 0.0
    out_px: int | None = None
    max_nodata: float | None = MAX_NODATA
    black_nodata: bool = False
    why: str = ""

    def check(self) -> "Tiling":
        """Refuse impossible settings (one line naming the flag)."""
        if self.tile_size < 1:
            raise RsitrError(f"--tile-size must be >= 1, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise RsitrError(f"--overlap must be in [0, tile size {self.tile_size}), got {self.overlap}")
        if self.max_nodata is not None and not 0.0 <= self.max_nodata <= 1.0:
            raise RsitrError(f"--max-nodata must be a fraction in [0, 1], got {self.max_nodata}")
        if self.meters is not None:
            if not self.meters or not all(isinstance(m, (int, float)) and math.isfinite(m) and m > 0 for m in self.meters):
                raise RsitrError(f"--tile-meters must be positive numbers of metres, got {list(self.meters)}")
            if not 0.0 <= self.overlap_m < min(self.meters):
                raise RsitrError(f"--overlap must be in [0, {min(self.meters):g}) metres (the smallest --tile-meters), got {self.overlap_m:g}")
            if not self.out_px or self.out_px < 1:
                raise RsitrError("tiling in metres needs the model's input size (out_px)")
        return self

    def describe(self) -> str:
        if self.meters is None:
            return f"{self.tile_size}-pixel tiles" + (f" ({self.overlap} px overlap)" if self.overlap else "")
        names = [f"{m:g} m" for m in self.meters]
        text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{text} tiles" + (f" ({self.overlap_m:g} m overlap)" if self.overlap_m else "")

    def to_manifest(self) -> dict:
        """The manifest's ``tiling`` object (pixel tiling: ``tile_size``/``overlap`` only, as before)."""
        d: dict = {"tile_size": int(self.tile_size), "overlap": int(self.overlap)}
        if self.meters is not None:
            d.update(unit="m", meters=[float(m) for m in self.meters], overlap_m=float(self.overlap_m), out_px=int(self.out_px or 0))
        return d

    @classmethod
    def from_manifest(cls, tiling: dict, max_nodata: float | None, black_nodata: bool = False) -> "Tiling":
        meters = tiling.get("meters")
        return cls(tile_size=int(tiling["tile_size"]), overlap=int(tiling["overlap"]),
                   meters=tuple(float(m) for m in meters) if meters else None, overlap_m=float(tiling.get("overlap_m", 0.0)),
                   out_px=tiling.get("out_px"), max_nodata=max_nodata, black_nodata=bool(black_nodata), why="as the index records")


@dataclass
class Scan:
    """What scanning found: the items, the tiles skipped as mostly no-data, and the log lines
    (``(level, message)``) a scan of a scene produced, for the caller to log (a Ray task's logs
    do not reach the driver)."""

    items: list[Item] = field(default_factory=list)
    skipped_nodata: int = 0
    notes: list[tuple[int, str]] = field(default_factory=list)

    def extend(self, other: "Scan") -> None:
        self.items.extend(other.items)
        self.skipped_nodata += other.skipped_nodata
        self.notes.extend(other.notes)

    def log_notes(self) -> None:
        for level, msg in self.notes:
            log.log(level, "%s", msg)


def _tiling_of(tile_size: int, overlap: int, tiling: Tiling | None) -> Tiling:
    return tiling if tiling is not None else Tiling(tile_size=tile_size, overlap=overlap)


def scan_file(path: Path, tile_size: int = 256, overlap: int = 0, *, tiling: Tiling | None = None) -> list[Item]:
    """Items of one file (tiles of a georeferenced raster, else the whole image); ``tiling``
    overrides ``tile_size``/``overlap``. Its notes are logged."""
    scan = scan_scene(path, _tiling_of(tile_size, overlap, tiling))
    scan.log_notes()
    return scan.items


def scan_scene(path: Path, tiling: Tiling) -> Scan:
    """The :class:`Scan` of one file: a georeferenced raster cut by ``tiling`` (mostly-no-data
    tiles skipped), a raster with a transform but no CRS in pixel tiles, any other image whole."""
    rio = rasterio_or_none()
    if path.suffix.lower() in TIFF_SUFFIXES and rio is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning
                with rio.open(path) as ds:
                    if not ds.transform.is_identity:
                        return _tiles(ds, path, tiling)
        except rio.errors.RasterioIOError:
            pass  # not a raster GDAL reads: PIL gets its chance below
    from rsitr.data.images import image_size

    image_size(path)  # header check: raises DataError naming the file
    return Scan([Item(key=item_key(path, None), path=str(path))])


def _check_place(ds, path: Path) -> None:
    """A scene whose extent leaves the globe (latitude outside +-90) is an error naming the file."""
    b = ds.bounds
    if ds.crs.is_geographic and (min(b.bottom, b.top) < -90.0 or max(b.bottom, b.top) > 90.0):
        raise DataError(f"{path}: its bounds reach latitude {max(abs(b.bottom), abs(b.top)):g} (outside +-90) in the geographic "
                        f"CRS {ds.crs}; its transform or CRS is wrong")
    from rsitr.search.geo import to_wgs84

    try:
        wb = to_wgs84(list(b), ds.crs)
    except Exception as exc:  # noqa: BLE001 - PROJ refuses points off the globe
        raise DataError(f"{path}: its bounds cannot be placed on the globe in {ds.crs} ({exc})") from exc
    if not all(math.isfinite(v) for v in wb) or abs(wb[1]) > 90.0 or abs(wb[3]) > 90.0:
        raise DataError(f"{path}: its bounds transform to latitudes outside +-90 ({wb[1]:g}..{wb[3]:g}); its transform or CRS is wrong")


def _tiles(ds, path: Path, tiling: Tiling) -> Scan:
    from rasterio.windows import Window, bounds as window_bounds

    from rsitr.search.geo import crs_string, to_wgs84
    from rsitr.search.scenes import metre_windows, validity_grid

    scan = Scan()
    has_crs = ds.crs is not None
    if not has_crs:
        scan.notes.append((logging.WARNING, f"{path}: has a transform but no CRS: cut in {tiling.tile_size}-pixel tiles without "
                                            f"footprints (set its CRS, e.g. gdal_edit.py -a_srs EPSG:XXXX, to tile it on the ground)"))
    else:
        _check_place(ds, path)
    crs = crs_string(ds.crs) if has_crs else None
    cut: list[tuple[list[int], dict]] = []
    if has_crs and tiling.meters is not None:
        scan.notes.append((logging.INFO, f"tiling {path.name} in {tiling.describe()}" + (f" ({tiling.why})" if tiling.why else "")))
        scales, px_m = [], None
        for m in tiling.meters:
            wins = list(metre_windows(ds, m, tiling.overlap_m, int(tiling.out_px)))
            across = sorted(mw.window[2] for mw in wins)[len(wins) // 2]
            px_m = m / max(1, across)
            if across < MIN_TILE_PX and not (wins and wins[0].clipped and len(wins) == 1):
                scan.notes.append((logging.WARNING, f"{path.name}: {m:g} m tiles would be {across} px of this scene "
                                                    f"({px_m:.2g} m/px), too coarse to show anything: that scale is left out here"))
                continue
            scales.append((m, wins))
        if not scales:  # every scale too fine for this raster: one scale of MIN_TILE_PX source pixels
            m = float(math.ceil(MIN_TILE_PX * px_m / 10.0) * 10.0)
            scan.notes.append((logging.WARNING, f"{path.name}: tiled in {m:g} m tiles instead ({MIN_TILE_PX} px at {px_m:.2g} m/px)"))
            scales.append((m, list(metre_windows(ds, m, tiling.overlap_m if tiling.overlap_m < m else 0.0, int(tiling.out_px)))))
        for m, wins in scales:
            for mw in wins:
                extra: dict = {"scale_m": float(m), "px": list(mw.out)}
                if mw.window == (0, 0, ds.width, ds.height) and mw.clipped:
                    extra["whole_scene"] = True  # the scene is smaller than one tile
                cut.append((list(mw.window), extra))
        min_tile = min(w[2] for w, _ in cut)
    else:
        if has_crs and tiling.why:
            scan.notes.append((logging.INFO, f"tiling {path.name} in {tiling.describe()} ({tiling.why})"))
        for row in tile_offsets(ds.height, tiling.tile_size, tiling.overlap):
            for col in tile_offsets(ds.width, tiling.tile_size, tiling.overlap):
                cut.append(([col, row, min(tiling.tile_size, ds.width - col), min(tiling.tile_size, ds.height - row)], {}))
        min_tile = tiling.tile_size
    grid = validity_grid(ds, min_tile) if tiling.max_nodata is not None else None
    if grid is not None and not grid.grid.any():
        scan.notes.append((logging.WARNING, f"{path}: every pixel is no-data (nodata value, alpha 0 or NaN): skipped"))
        return scan
    if grid is not None and tiling.black_nodata and not grid.declared:
        grid = grid.black_as_nodata()  # mostly black tiles are then skipped and counted as no-data ones
        scan.notes.append((logging.INFO, f"{path.name}: --black-nodata: pure black counts as no-data (the raster declares none)"))
    seen: set[str] = set()
    black = 0
    for win, extra in cut:
        key = item_key(path, win)
        if key in seen:  # the same window at two scales (a scene smaller than both tiles)
            continue
        seen.add(key)
        if grid is not None and 1.0 - grid.fraction(win) > tiling.max_nodata:
            scan.skipped_nodata += 1
            continue
        if grid is not None and not grid.declared and grid.black_fraction(win) > tiling.max_nodata:
            black += 1
        bounds = wgs = None
        if has_crs:
            b = window_bounds(Window(*win), ds.transform)  # (left, bottom, right, top)
            bounds = [float(b[0]), float(b[1]), float(b[2]), float(b[3])]
            wgs = to_wgs84(bounds, ds.crs)
        scan.items.append(Item(key=key, path=str(path), window=win, bounds=bounds, crs=crs, wgs84=wgs, extra=extra))
    if scan.skipped_nodata:
        scan.notes.append((logging.INFO, f"{path.name}: skipped {scan.skipped_nodata} tiles that are mostly no-data "
                                         f"(more than {tiling.max_nodata:.0%} of their pixels)"))
    if black:
        scan.notes.append((logging.WARNING, f"{path}: {black} of {len(scan.items)} tiles are mostly pure black (0 in every band; more "
                                            f"than {tiling.max_nodata:.0%} of their pixels) but the raster declares no no-data value, "
                                            f"alpha band or mask, so they are indexed as imagery and can rank among the hits; if black "
                                            f"is fill here, build with --black-nodata or declare it (gdal_edit.py -a_nodata 0 FILE), "
                                            f"and rebuild"))
    return scan


def scan_source(source: str | os.PathLike, tile_size: int = 256, overlap: int = 0, *, skip_bad: bool = False,
                tiling: Tiling | None = None) -> list[Item]:
    """Every item under ``source`` in a deterministic order (sorted paths, tiles row-major)."""
    scan = scan_source_report(source, _tiling_of(tile_size, overlap, tiling), skip_bad=skip_bad)
    return scan.items


def scan_source_report(source: str | os.PathLike, tiling: Tiling, *, skip_bad: bool = False) -> Scan:
    """:func:`scan_source` with the no-data count; every scene's notes are logged as it is scanned."""
    from rsitr.data.images import ImageTooLarge

    tiling.check()
    out = Scan()
    skipped = {"over the pixel limit": 0, "unreadable": 0}
    for path in iter_image_files(source):
        try:
            scan = scan_scene(path, tiling)
        except DataError as exc:
            if not skip_bad:
                raise
            skipped["over the pixel limit" if isinstance(exc, ImageTooLarge) else "unreadable"] += 1
            log.warning("skipped: %s", exc)
            continue
        scan.log_notes()
        out.extend(scan)
    if any(skipped.values()):
        log.warning("--skip-bad: skipped %d file(s) of %s: %s", sum(skipped.values()), source,
                    ", ".join(f"{n} {why}" for why, n in skipped.items() if n))
    return out


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
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from rsitr.search.scenes import scene_render

    col, row, w, h = item.window
    px = item.extra.get("px")  # metre tiles: read resampled straight to this [width, height]
    try:
        render = scene_render(path)  # the scene's bands and stretch (computed once per scene)
        with rio.open(path) as ds:
            kw: dict = {}
            if px:
                kw = {"out_shape": (len(render.bands), int(px[1]), int(px[0])),
                      "resampling": Resampling.average if w > px[0] else Resampling.bilinear}
            arr = ds.read(list(render.bands), window=Window(col, row, w, h), masked=True, **kw)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver failure means unreadable
        raise DataError(f"{path}: cannot read tile {item.window} ({exc})") from exc
    if str(path) not in _warned_nodata:
        from rsitr.search.scenes import valid_of

        if not valid_of(arr).any():  # kept only when --max-nodata allows it (or an index from before the rule)
            _warned_nodata.add(str(path))
            log.warning("%s: tile %s is all no-data (NaN, alpha 0 or the declared nodata value): indexed as a black tile "
                        "(said once per file)", path, item.window)
    return Image.fromarray(np.ascontiguousarray(render.to_rgb(arr)), "RGB")
