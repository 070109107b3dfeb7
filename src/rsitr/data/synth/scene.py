"""The scene model of the synthetic benchmark: what one tile holds, and the geometry captions talk about.

A :class:`Scene` is the description a tile is rendered from and its captions are written from:
the scene class, landmarks (bands such as rivers, roads and runways; shores; a lake, a lot...) as
plain dicts, and countable :class:`Obj` objects. Coordinates are fractions of the tile (x right,
y down). The queries here (3x3 cells, band centre lines, sides of a band, the water side of a
shore) are shared by the builders, the caption language and the renderer, and by the tests that
check every caption's claims against the geometry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

CLASSES: tuple[str, ...] = (
    "airport", "bareland", "beach", "farmland", "forest", "industrial", "junction",
    "lake", "parking", "port", "residential", "river", "stadium", "storagetanks",
)


@dataclass
class Obj:
    """A countable object. Coordinates are fractions of the tile (x right, y down); (x, y) is the
    centre, (w, h) the size along the object's own axes, ``angle`` in radians."""

    kind: str
    color: str | None
    x: float
    y: float
    w: float
    h: float
    angle: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)
    big: bool = False  # drawn larger than its siblings (e.g. the terminal, a farmhouse)

    @property
    def radius(self) -> float:
        return 0.5 * math.hypot(self.w, self.h)


@dataclass
class Scene:
    """Everything drawn in one tile; captions are rendered from it."""

    cls: str
    bg: tuple[int, int, int]
    landmarks: dict[str, dict] = field(default_factory=dict)
    objects: list[Obj] = field(default_factory=list)

    def of(self, kind: str, color: str | None = None) -> list[Obj]:
        return [o for o in self.objects if o.kind == kind and (color is None or o.color == color)]

    def count(self, kind: str, color: str | None = None) -> int:
        return len(self.of(kind, color))


def region_of(x: float, y: float) -> tuple[int, int]:
    """3x3 grid cell (col, row) of a point."""
    return min(int(x * 3), 2), min(int(y * 3), 2)


def band_center(lm: dict, t: float) -> float:
    """Centre line of a band landmark (river, road, runway) at position t along its axis."""
    return lm["c"] + lm.get("amp", 0.0) * math.sin(2 * math.pi * lm.get("freq", 0.0) * t + lm.get("phase", 0.0))


def side_of_band(lm: dict, o: Obj) -> str | None:
    """Which side of a band landmark an object lies on entirely ("left"/"right" for vertical
    bands, "top"/"bottom" for horizontal ones), or None when it touches the band."""
    r = o.radius
    along, across = along_across(lm, o.x, o.y)
    c = band_center(lm, along)
    lo, hi = band_sides(lm)
    if across + r < c - lm["w"] / 2:
        return lo
    if across - r > c + lm["w"] / 2:
        return hi
    return None


def on_water_side(lm: dict, x: float, y: float, margin: float = 0.0) -> bool:
    """Whether a point lies in a shore landmark's water (side, extent, with a wavy shoreline)."""
    side, ext = lm["side"], lm["extent"]
    t = y if side in ("left", "right") else x
    edge = ext + lm.get("amp", 0.0) * math.sin(2 * math.pi * lm.get("freq", 1.0) * t + lm.get("phase", 0.0))
    d = {"left": x, "right": 1 - x, "top": y, "bottom": 1 - y}[side]
    return d < edge - margin


def pick(rng: np.random.Generator, seq):
    """One element of ``seq`` (one ``integers`` draw: the order of picks is part of the output)."""
    return seq[int(rng.integers(len(seq)))]


def common_region(objs: list[Obj], margin: float = 0.03) -> tuple[int, int] | None:
    """The 3x3 cell holding every object's centre, at least ``margin`` inside the cell (so a
    caption never names a cell an object only grazes), else None."""
    cells = {region_of(o.x, o.y) for o in objs}
    if len(cells) != 1:
        return None
    cell = cells.pop()
    x0, y0, x1, y1 = cell[0] / 3, cell[1] / 3, (cell[0] + 1) / 3, (cell[1] + 1) / 3
    inside = all(x0 + margin <= o.x <= x1 - margin and y0 + margin <= o.y <= y1 - margin for o in objs)
    return cell if inside else None


def along_across(lm: dict, x: float, y: float) -> tuple[float, float]:
    """A point's coordinates (along, across) a band landmark's axis."""
    return (y, x) if lm["orient"] == "vertical" else (x, y)


def band_sides(lm: dict) -> tuple[str, str]:
    """The names of a band's two sides: (left, right) of a vertical band, (top, bottom) of a horizontal one."""
    return ("left", "right") if lm["orient"] == "vertical" else ("top", "bottom")


def away_from_band(lm: dict, margin: float) -> Callable[..., bool]:
    """The whole circle (centre, r) stays ``margin`` away from the band."""
    def ok(x: float, y: float, r: float = 0.0) -> bool:
        along, across = along_across(lm, x, y)
        return abs(across - band_center(lm, along)) > lm["w"] / 2 + margin + r

    return ok


def on_band(lm: dict, margin: float) -> Callable[..., bool]:
    """The centre lies inside the band, ``margin`` from its edges (objects aligned with it)."""
    def ok(x: float, y: float, r: float = 0.0) -> bool:
        along, across = along_across(lm, x, y)
        return abs(across - band_center(lm, along)) < lm["w"] / 2 - margin

    return ok
