"""Footprints: raster bounds -> WGS84, GeoJSON FeatureCollections of search results.

A tile's footprint is its bounding box in the raster's CRS, transformed to WGS84 (EPSG:4326,
lon/lat order) with :func:`rasterio.warp.transform_bounds` (which densifies the edges, so the
WGS84 box contains the whole projected tile). The GeoJSON polygon is that WGS84 box.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Sequence

from rsitr.utils.io import atomic_write_text


def to_wgs84(bounds: Sequence[float], crs: Any) -> list[float]:
    """``(left, bottom, right, top)`` in ``crs`` -> ``[west, south, east, north]`` in EPSG:4326."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    src = crs if isinstance(crs, CRS) else CRS.from_user_input(crs)
    out = transform_bounds(src, CRS.from_epsg(4326), *[float(b) for b in bounds], densify_pts=21)
    return [float(v) for v in out]


def crs_string(crs) -> str:
    """A compact, round-trippable name for a CRS: ``EPSG:32633`` when it has a code, else WKT."""
    epsg = crs.to_epsg() if crs is not None else None
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def bbox_polygon(w: float, s: float, e: float, n: float) -> dict:
    """A closed GeoJSON polygon (counter-clockwise exterior ring) of a lon/lat box."""
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def feature_collection(results: Iterable[dict], query: str | None = None) -> dict:
    """GeoJSON FeatureCollection of the results that have a WGS84 footprint (others skipped)."""
    feats = []
    for r in results:
        wb = r.get("wgs84")
        if not wb or not all(math.isfinite(v) for v in wb):
            continue
        props = {k: r.get(k) for k in ("rank", "score", "id", "path", "window", "crs")}
        feats.append({"type": "Feature", "id": r.get("id"), "geometry": bbox_polygon(*wb), "properties": props})
    fc: dict = {"type": "FeatureCollection", "features": feats}
    if query is not None:
        fc["query"] = query
    return fc


def write_geojson(path: str | os.PathLike, results: Iterable[dict], query: str | None = None) -> int:
    fc = feature_collection(results, query)
    atomic_write_text(path, json.dumps(fc, indent=1) + "\n")
    return len(fc["features"])
