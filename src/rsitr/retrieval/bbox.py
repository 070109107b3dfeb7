"""WGS84 bounding-box filters: parse ``W,S,E,N``, test footprints against a box.

A box is ``[west, south, east, north]`` in degrees (EPSG:4326, lon/lat order), as in GeoJSON and
STAC. ``west > east`` means the box crosses the antimeridian (it covers ``[west, 180]`` and
``[-180, east]``); the same holds for a footprint whose ``west > east``. Latitudes must satisfy
``-90 <= south <= north <= 90``. Edges are closed: a footprint that only touches the box
intersects it (a box of zero width or height, e.g. a point, selects the tiles containing it).

:func:`intersects` is the one definition of "a footprint intersects the box"; the FAISS store
applies it with numpy, and a store that filters inside a database writes the same test in its
own filter language (:mod:`rsitr.retrieval.stores`), so every store selects exactly the same tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rsitr.utils.errors import RsitrError


@dataclass(frozen=True)
class BBox:
    west: float
    south: float
    east: float
    north: float

    @property
    def crosses_antimeridian(self) -> bool:
        return self.west > self.east

    def as_list(self) -> list[float]:
        return [self.west, self.south, self.east, self.north]

    def __str__(self) -> str:
        return ",".join(repr(v) for v in self.as_list())


def parse_bbox(value: Any) -> BBox:
    """``"W,S,E,N"`` (or 4 numbers) -> :class:`BBox`; anything else is one :class:`RsitrError`."""
    if isinstance(value, BBox):
        return value
    raw = value
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise RsitrError(f"bbox: expected 'W,S,E,N' (WGS84 degrees), got {raw!r}")
    if len(parts) != 4:
        raise RsitrError(f"bbox: expected 4 comma-separated numbers W,S,E,N (WGS84 degrees), got {len(parts)} in {raw!r}")
    try:
        w, s, e, n = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise RsitrError(f"bbox: W,S,E,N must be numbers, got {raw!r}") from None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise RsitrError(f"bbox: W,S,E,N must be finite numbers, got {raw!r}")
    if not (-180.0 <= w <= 180.0 and -180.0 <= e <= 180.0):
        raise RsitrError(f"bbox: longitudes must be in [-180, 180], got west={w:g}, east={e:g}")
    if not (-90.0 <= s <= 90.0 and -90.0 <= n <= 90.0):
        raise RsitrError(f"bbox: latitudes must be in [-90, 90], got south={s:g}, north={n:g}")
    if s > n:
        raise RsitrError(f"bbox: south ({s:g}) is north of north ({n:g}); the order is W,S,E,N")
    return BBox(w, s, e, n)


def footprint_array(footprints: Sequence[Sequence[float] | None]) -> tuple[np.ndarray, np.ndarray]:
    """``([n, 4] float64 west/south/east/north, [n] bool has_geo)``; missing footprints are zeros
    with ``has_geo`` False (they never match a box)."""
    n = len(footprints)
    fp = np.zeros((n, 4), np.float64)
    has = np.zeros(n, bool)
    for i, b in enumerate(footprints):
        if b is not None and len(b) == 4 and all(math.isfinite(float(v)) for v in b):
            fp[i] = [float(v) for v in b]
            has[i] = True
    return fp, has


def intersects(fp: np.ndarray, has_geo: np.ndarray, box: BBox) -> np.ndarray:
    """Boolean mask ``[n]``: footprints (``[n, 4]``, see :func:`footprint_array`) intersecting ``box``."""
    w, s, e, n = fp[:, 0], fp[:, 1], fp[:, 2], fp[:, 3]
    lat = (s <= box.north) & (n >= box.south)
    crosses = w > e
    if box.crosses_antimeridian:
        lon = crosses | (e >= box.west) | (w <= box.east)
    else:
        lon = np.where(crosses, (w <= box.east) | (e >= box.west), (w <= box.east) & (e >= box.west))
    return has_geo & lat & lon


__all__ = ["BBox", "footprint_array", "intersects", "parse_bbox"]
