"""The synthetic benchmark: procedurally drawn aerial-like tiles with captions that are true of them.

``rsitr data synth --out DIR`` (:func:`write_synth`) writes the layout of the real benchmarks::

    DIR/images/<class>_<k>.png      RSICD-style names: the scene class is in the file name
    DIR/labels.csv                  filename,class
    DIR/dataset_synth.json          Karpathy layout ({"dataset", "images": [{"filename", "imgid",
                                    "split", "sentids", "sentences": [{"raw", "tokens", "imgid",
                                    "sentid", "noisy"}]}]})

How an image is made. For image ``i`` a :class:`Scene` (the description) is drawn from a numpy
Generator seeded by ``(seed, i)``: the scene class, landmarks (river, roads, runway, water,
lake, field grid, track, parking lot) and countable objects (buildings, houses, trees, cars,
ships, airplanes, storage tanks, fields, umbrellas, containers) with colour names, positions and
orientations. The tile is rendered from the scene with PIL ``ImageDraw`` (shadows, roof ridges,
lane markings, stripes, ripples), then textured (low-frequency illumination and grain noise) so
classes are not separable by mean colour. The five captions are rendered from the *same* scene:
one or two generic sentences and three or four detailed ones that state counts ("three red
cars"), colours ("a white ship") and spatial relations ("in the top right corner", "to the left
of the river", "next to the runway"), so two tiles of one class differ in what their captions
say. Every detailed caption carries machine-checkable claims (:class:`Caption.claims`) that the
tests verify against the scene geometry.

Conventions of the caption text: a number word (``one`` ... ``twelve``) in front of a noun,
optionally with a colour word (``"three red cars"``) or followed by ``"with <colour> roofs"``,
is the exact number of such objects in the whole image; larger counts are said as "many".

Noise (``noise_frac``): that fraction of the *train* captions is replaced by weakly related
ones — a caption of an image of another class (2/3) or an unrelated generic sentence (1/3) —
marked ``"noisy": true`` in the JSON (``false`` elsewhere; Karpathy readers ignore the field).
At most 4 of an image's 5 captions are replaced. Val/test captions are never touched.

Determinism: same arguments -> byte-identical JSON, CSV and PNGs, whatever ``workers`` is (each
image has its own generator; no global RNG). Atomicity: an existing JSON is removed first, the
images are written to a temporary folder that replaces ``images/`` once complete, then
labels.csv and finally the JSON are written atomically — a crash never leaves a JSON that points
at missing or half-written images.

The benchmark is for tests, the demo and relative comparisons; never tune a method to it.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from rsitr.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "airport", "bareland", "beach", "farmland", "forest", "industrial", "junction",
    "lake", "parking", "port", "residential", "river", "stadium", "storagetanks",
)
CAPTIONS_PER_IMAGE = 5
MAX_NOISY_PER_IMAGE = CAPTIONS_PER_IMAGE - 1

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")

# kind -> [(singular, plural), ...]: the nouns captions use for each countable kind
NOUNS: dict[str, list[tuple[str, str]]] = {
    "car": [("car", "cars"), ("vehicle", "vehicles")],
    "building": [("building", "buildings")],
    "house": [("house", "houses")],
    "tree": [("tree", "trees")],
    "ship": [("ship", "ships"), ("boat", "boats"), ("vessel", "vessels")],
    "airplane": [("airplane", "airplanes"), ("plane", "planes"), ("aircraft", "aircraft")],
    "tank": [("storage tank", "storage tanks"), ("oil tank", "oil tanks"), ("tank", "tanks")],
    "field": [("field", "fields"), ("parcel", "parcels"), ("plot", "plots")],
    "umbrella": [("umbrella", "umbrellas"), ("parasol", "parasols")],
    "container": [("container", "containers")],
}

# colour names -> base RGB (each object gets a small jitter)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (186, 48, 42), "white": (236, 236, 230), "blue": (48, 86, 176), "black": (34, 34, 38),
    "grey": (132, 132, 134), "yellow": (226, 198, 62), "green": (70, 150, 64), "orange": (230, 128, 40),
    "brown": (128, 86, 52),
}
CAR_COLORS = ("red", "white", "blue", "black", "grey", "yellow")
ROOF_COLORS = ("red", "grey", "brown", "white", "blue")
SHIP_COLORS = ("white", "red", "blue", "black", "orange")
FIELD_RGB = {"green": (86, 150, 58), "yellow": (204, 186, 92), "brown": (146, 108, 72)}

GRASS = ((88, 128, 62), (104, 140, 70), (76, 114, 58), (118, 136, 80))
SOIL = ((168, 142, 108), (152, 124, 92), (184, 162, 122), (140, 112, 82))
WATER = ((40, 82, 122), (30, 70, 110), (52, 96, 130), (36, 90, 104))
ASPHALT = (88, 88, 92)
CONCRETE = (176, 174, 168)
SAND = (222, 204, 156)
TREE_GREEN = ((46, 92, 40), (38, 80, 36), (58, 104, 46), (50, 86, 34))

REGION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the upper left"),
    (1, 0): ("at the top", "in the upper part"),
    (2, 0): ("in the top right corner", "at the upper right"),
    (0, 1): ("on the left side", "on the left"),
    (1, 1): ("in the center", "in the middle"),
    (2, 1): ("on the right side", "on the right"),
    (0, 2): ("in the bottom left corner", "at the lower left"),
    (1, 2): ("at the bottom", "in the lower part"),
    (2, 2): ("in the bottom right corner", "at the lower right"),
}

GENERIC_NOISE = (
    "a picture taken on a sunny day .",
    "this photo was uploaded to a website .",
    "a close up photo of a cat sleeping on a sofa .",
    "some text printed on a white page .",
    "a blurry photograph of something .",
    "people are walking in a shopping mall .",
    "a plate of food on a wooden table .",
    "an old map hanging on a wall .",
)


# -- scene description ---------------------------------------------------------------------------
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


@dataclass
class Caption:
    """A caption and the facts it states. Claims:
    ("count", kind, color|None, n)            exactly n such objects in the image
    ("region", kind, color|None, (col, row))  every such object's centre in that 3x3 cell
    ("side", kind, color|None, landmark, s)   every such object on side s of the landmark
    ("landmark", name, key, value)            scene.landmarks[name][key] == value
    """

    text: str
    claims: list[tuple] = field(default_factory=list)


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
    if lm["orient"] == "vertical":
        c = band_center(lm, o.y)
        if o.x + r < c - lm["w"] / 2:
            return "left"
        if o.x - r > c + lm["w"] / 2:
            return "right"
        return None
    c = band_center(lm, o.x)
    if o.y + r < c - lm["w"] / 2:
        return "top"
    if o.y - r > c + lm["w"] / 2:
        return "bottom"
    return None


def on_water_side(lm: dict, x: float, y: float, margin: float = 0.0) -> bool:
    """Whether a point lies in a shore landmark's water (side, extent, with a wavy shoreline)."""
    side, ext = lm["side"], lm["extent"]
    t = y if side in ("left", "right") else x
    edge = ext + lm.get("amp", 0.0) * math.sin(2 * math.pi * lm.get("freq", 1.0) * t + lm.get("phase", 0.0))
    d = {"left": x, "right": 1 - x, "top": y, "bottom": 1 - y}[side]
    return d < edge - margin


# -- helpers -------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _jitter(rgb, rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(e)))) for c, e in zip(rgb, d))  # type: ignore[return-value]


def _num(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else "many"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(kind: str, n: int, rng: np.random.Generator) -> str:
    sing, plur = _pick(rng, NOUNS[kind])
    return sing if n == 1 else plur


def count_phrase(kind: str, n: int, rng: np.random.Generator, color: str | None = None) -> tuple[str, list[tuple]]:
    """"three red cars" / "a white ship" / "many cars", and its claims (exact counts only)."""
    noun = _noun(kind, n, rng)
    adj = f"{color} " if color else ""
    if n == 1:
        first = (adj or noun)
        det = "one" if rng.random() < 0.3 else _article(first)
        return f"{det} {adj}{noun}", [("count", kind, color, 1)]
    if n <= 12:
        return f"{_num(n)} {adj}{noun}", [("count", kind, color, n)]
    return f"many {adj}{noun}", []


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _region_phrase(cell: tuple[int, int], rng: np.random.Generator) -> str:
    return _pick(rng, REGION_PHRASES[cell])


def _common_region(objs: list[Obj], margin: float = 0.03) -> tuple[int, int] | None:
    """The 3x3 cell holding every object's centre, at least ``margin`` inside the cell (so a
    caption never names a cell an object only grazes), else None."""
    cells = {region_of(o.x, o.y) for o in objs}
    if len(cells) != 1:
        return None
    cell = cells.pop()
    x0, y0, x1, y1 = cell[0] / 3, cell[1] / 3, (cell[0] + 1) / 3, (cell[1] + 1) / 3
    inside = all(x0 + margin <= o.x <= x1 - margin and y0 + margin <= o.y <= y1 - margin for o in objs)
    return cell if inside else None


def _color_counts(objs: list[Obj]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in objs:
        out[o.color] = out.get(o.color, 0) + 1  # type: ignore[index]
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


class _Placer:
    """Rejection sampling of non-overlapping circles (object centre + radius)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.taken: list[tuple[float, float, float]] = []

    def block(self, x: float, y: float, r: float) -> None:
        self.taken.append((x, y, r))

    def free(self, x: float, y: float, r: float, pad: float) -> bool:
        return all((x - a) ** 2 + (y - b) ** 2 >= (r + c + pad) ** 2 for a, b, c in self.taken)

    def place(self, r: float, box=(0.0, 0.0, 1.0, 1.0), ok: Callable[[float, float], bool] | None = None,
              pad: float = 0.01, tries: int = 60) -> tuple[float, float] | None:
        """A free centre for a circle of radius r inside ``box``; ``ok(x, y, r)`` may veto."""
        x0, y0, x1, y1 = box
        x0, y0, x1, y1 = x0 + r, y0 + r, x1 - r, y1 - r
        if x1 <= x0 or y1 <= y0:
            return None
        for _ in range(tries):
            x, y = float(self.rng.uniform(x0, x1)), float(self.rng.uniform(y0, y1))
            if self.free(x, y, r, pad) and (ok is None or ok(x, y, r)):
                self.block(x, y, r)
                return x, y
        return None


def _cell_box(cell: tuple[int, int], margin: float = 0.01) -> tuple[float, float, float, float]:
    c, r = cell
    return c / 3 + margin, r / 3 + margin, (c + 1) / 3 - margin, (r + 1) / 3 - margin


def _add(scene: Scene, placer: _Placer, rng, kind: str, color: str | None, w: float, h: float, *, angle: float = 0.0,
         box=(0.0, 0.0, 1.0, 1.0), ok=None, pad: float = 0.01, rgb=None, big: bool = False) -> Obj | None:
    r = 0.5 * math.hypot(w, h)
    pos = placer.place(r, box, ok, pad)
    if pos is None:
        return None
    base = rgb if rgb is not None else (COLORS[color] if color else (128, 128, 128))
    o = Obj(kind, color, pos[0], pos[1], w, h, angle, _jitter(base, rng, 10), big)
    scene.objects.append(o)
    return o


def _band(rng, orient: str | None = None, w=(0.1, 0.16), wiggle: float = 0.0, c=(0.3, 0.7)) -> dict:
    return {
        "orient": orient or _pick(rng, ("vertical", "horizontal")),
        "c": float(rng.uniform(*c)),
        "w": float(rng.uniform(*w)),
        "amp": float(rng.uniform(0.3, 1.0) * wiggle),
        "freq": float(rng.uniform(0.5, 1.2)) if wiggle else 0.0,
        "phase": float(rng.uniform(0, 2 * math.pi)),
    }


def _away_from_band(lm: dict, margin: float) -> Callable[..., bool]:
    """The whole circle (centre, r) stays ``margin`` away from the band."""
    def ok(x: float, y: float, r: float = 0.0) -> bool:
        if lm["orient"] == "vertical":
            return abs(x - band_center(lm, y)) > lm["w"] / 2 + margin + r
        return abs(y - band_center(lm, x)) > lm["w"] / 2 + margin + r

    return ok


def _on_band(lm: dict, margin: float) -> Callable[..., bool]:
    """The centre lies inside the band, ``margin`` from its edges (objects aligned with it)."""
    def ok(x: float, y: float, r: float = 0.0) -> bool:
        if lm["orient"] == "vertical":
            return abs(x - band_center(lm, y)) < lm["w"] / 2 - margin
        return abs(y - band_center(lm, x)) < lm["w"] / 2 - margin

    return ok


def _band_word(lm: dict, rng) -> str:
    if lm["orient"] == "vertical":
        return _pick(rng, ("from top to bottom", "vertically"))
    return _pick(rng, ("from left to right", "horizontally"))


def _band_sides(lm: dict) -> tuple[str, str]:
    return ("left", "right") if lm["orient"] == "vertical" else ("top", "bottom")


def _side_phrase(side: str, name: str) -> str:
    return {"left": f"to the left of the {name}", "right": f"to the right of the {name}",
            "top": f"above the {name}", "bottom": f"below the {name}"}[side]


def _scatter_trees(scene, placer, rng, n, ok=None, box=(0.0, 0.0, 1.0, 1.0), size=(0.035, 0.06), color="green"):
    for _ in range(n):
        s = float(rng.uniform(*size))
        _add(scene, placer, rng, "tree", color, s, s, box=box, ok=ok, pad=-0.004, rgb=_pick(rng, TREE_GREEN) if color == "green" else None)


def _count_sentence(scene: Scene, kind: str, rng, tail: str, color: str | None = None) -> Caption | None:
    n = scene.count(kind, color)
    if n == 0:
        return None
    phrase, claims = count_phrase(kind, n, rng, color)
    return Caption(f"{phrase} {_be(n)} {tail} .", claims)


def _region_sentence(scene: Scene, kind: str, rng, color: str | None, lead: str = "") -> Caption | None:
    objs = scene.of(kind, color)
    if not objs:
        return None
    cell = _common_region(objs)
    if cell is None:
        return None
    phrase, claims = count_phrase(kind, len(objs), rng, color)
    return Caption(f"{lead}{phrase} {_be(len(objs))} {_region_phrase(cell, rng)} .", claims + [("region", kind, color, cell)])


def _colour_breakdown(scene: Scene, kind: str, rng, verb: str) -> Caption | None:
    counts = _color_counts(scene.of(kind))
    if not counts or any(n > 12 for n in counts.values()):
        return None
    parts, claims = [], []
    for col, n in list(counts.items())[:3]:
        p, c = count_phrase(kind, n, rng, col)
        parts.append(p)
        claims += c
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    total = sum(counts.values())
    return Caption(f"{text} {_be(total if len(parts) > 1 else counts[next(iter(counts))])} {verb} .", claims)


# -- scene builders (one per class) ---------------------------------------------------------------
def _build_airport(rng) -> tuple[Scene, list[Caption], list[str]]:
    s = Scene("airport", _jitter(_pick(rng, GRASS), rng))
    rw = _band(rng, w=(0.13, 0.17), c=(0.28, 0.4))
    if rng.random() < 0.5:
        rw["c"] = 1 - rw["c"]
    s.landmarks["runway"] = rw
    p = _Placer(rng)
    side = "right" if rw["c"] < 0.5 else "left"
    if rw["orient"] == "horizontal":
        side = "bottom" if rw["c"] < 0.5 else "top"
    edge = rw["c"] + (rw["w"] / 2 + 0.05) * (1 if side in ("right", "bottom") else -1)
    if side == "right":
        apron = (edge, 0.04, 0.97, 0.96)
    elif side == "left":
        apron = (0.03, 0.04, edge, 0.96)
    elif side == "bottom":
        apron = (0.04, edge, 0.96, 0.97)
    else:
        apron = (0.04, 0.03, 0.96, edge)
    s.landmarks["apron"] = {"box": apron, "side": side}
    term_col = _pick(rng, ("white", "grey"))
    tw, th = (0.1, 0.3) if rw["orient"] == "vertical" else (0.3, 0.1)
    _add(s, p, rng, "building", term_col, tw, th, box=apron, pad=0.02, big=True)
    n = int(rng.integers(1, 6))
    for _ in range(n):
        ang = (math.pi / 2) * int(rng.integers(4))
        span = float(rng.uniform(0.12, 0.16))
        _add(s, p, rng, "airplane", "white" if rng.random() < 0.75 else "grey", span, span, angle=ang, box=apron, pad=0.005)
    _scatter_trees(s, p, rng, int(rng.integers(0, 6)), ok=_away_from_band(rw, 0.04))
    caps: list[Caption] = []
    name = _pick(rng, ("runway", "airstrip"))
    caps.append(Caption(f"a long {name} runs {_band_word(rw, rng)} across the airport .", [("landmark", "runway", "orient", rw["orient"])]))
    planes = s.of("airplane")
    if planes:
        ph, cl = count_phrase("airplane", len(planes), rng)
        caps.append(Caption(f"{ph} {_be(len(planes))} parked {_side_phrase(side, 'runway')} .", cl + [("side", "airplane", None, "runway", side)]))
        cb = _colour_breakdown(s, "airplane", rng, "parked on the apron")
        if cb:
            caps.append(cb)
    t = _region_sentence(s, "building", rng, term_col, lead="")
    if t:
        caps.append(Caption(t.text.replace(" building ", " terminal building ", 1), t.claims))
    if s.count("tree"):
        tr = _count_sentence(s, "tree", rng, "growing on the grass near the runway")
        if tr:
            caps.append(tr)
    generic = ["an airport with a runway .", "this is an airport seen from above .", "an aerial image of an airport .",
               "planes are parked at the airport ." if planes else "an airport without planes ."]
    return s, caps, generic


_GROUND_TONES = {"brown": (150, 118, 86), "yellow": (200, 176, 122), "reddish": (172, 114, 84), "grey": (152, 148, 138)}
_CANOPY = {"dark": ((34, 70, 30), (30, 62, 28), (40, 76, 34)), "light": ((72, 120, 52), (80, 128, 58), (66, 112, 48))}


def _build_bareland(rng):
    tone = _pick(rng, tuple(_GROUND_TONES))
    s = Scene("bareland", _jitter(_GROUND_TONES[tone], rng, 10))
    s.landmarks["ground"] = {"tone": tone}
    p = _Placer(rng)
    caps: list[Caption] = [Caption(f"the bare ground is {tone} .", [("landmark", "ground", "tone", tone)])]
    if rng.random() < 0.5:
        tr = _band(rng, w=(0.04, 0.06), wiggle=0.06)
        s.landmarks["track"] = tr
        caps.append(Caption(f"a dirt road crosses the bare land {_band_word(tr, rng)} .", [("landmark", "track", "orient", tr["orient"])]))
        ok = _away_from_band(tr, 0.02)
    else:
        ok = None
    n_trees = int(rng.integers(0, 6))
    if n_trees and rng.random() < 0.5:
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        _scatter_trees(s, p, rng, n_trees, ok=ok, box=_cell_box(cell), size=(0.03, 0.05))
    else:
        _scatter_trees(s, p, rng, n_trees, ok=ok, size=(0.03, 0.05))
    if rng.random() < 0.35:
        col = _pick(rng, ROOF_COLORS)
        sz = float(rng.uniform(0.07, 0.11))
        _add(s, p, rng, "building", col, sz, sz * float(rng.uniform(0.7, 1.3)), ok=ok, pad=0.02)
    if s.count("tree"):
        caps.append(_count_sentence(s, "tree", rng, _pick(rng, ("on the bare land", "growing on the bare ground"))))
        r = _region_sentence(s, "tree", rng, None)
        if r:
            caps.append(r)
    for b in s.of("building"):
        cell = _common_region([b])
        where = f" {_region_phrase(cell, rng)}" if cell else " on the bare land"
        caps.append(Caption(f"a small building with a {b.color} roof stands{where} .",
                            [("count", "building", b.color, 1)] + ([("region", "building", b.color, cell)] if cell else [])))
    if not s.objects:
        caps.append(Caption("there is nothing on the bare land .", [("count", "tree", None, 0), ("count", "building", None, 0)]))
    generic = ["a piece of bare land .", "an area of bare land .", "bare land seen from above .", "this is a piece of empty land ."]
    return s, caps, generic


_EDGE_PHRASE = {"left": "on the left side", "right": "on the right side", "top": "at the top", "bottom": "at the bottom"}


def _shore(rng) -> dict:
    return {"side": _pick(rng, ("left", "right", "top", "bottom")), "extent": float(rng.uniform(0.3, 0.42)),
            "amp": float(rng.uniform(0.01, 0.04)), "freq": float(rng.uniform(0.8, 2.0)), "phase": float(rng.uniform(0, 6.28))}


def _shore_box(side: str, lo: float, hi: float) -> tuple[float, float, float, float]:
    """Box at distance [lo, hi] from the ``side`` edge."""
    return {"left": (lo, 0.0, hi, 1.0), "right": (1 - hi, 0.0, 1 - lo, 1.0),
            "top": (0.0, lo, 1.0, hi), "bottom": (0.0, 1 - hi, 1.0, 1 - lo)}[side]


def _build_beach(rng):
    s = Scene("beach", _jitter(_pick(rng, GRASS), rng))
    sh = _shore(rng)
    sh["sand"] = float(rng.uniform(0.18, 0.26))
    s.landmarks["sea"] = sh
    p = _Placer(rng)
    sea_name = _pick(rng, ("sea", "ocean"))
    caps = [Caption(f"the {sea_name} is {_EDGE_PHRASE[sh['side']]} of the image .", [("landmark", "sea", "side", sh["side"])])]
    sand_box = _shore_box(sh["side"], sh["extent"] + 0.05, sh["extent"] + sh["sand"] - 0.02)
    n_u = int(rng.integers(0, 7))
    ucols = ("red", "yellow", "blue", "white")
    for _ in range(n_u):
        d = float(rng.uniform(0.03, 0.045))
        _add(s, p, rng, "umbrella", _pick(rng, ucols), d, d, box=sand_box, ok=lambda x, y, r: not on_water_side(sh, x, y, -0.02), pad=0.005)
    n_b = int(rng.integers(0, 4))
    water_box = _shore_box(sh["side"], 0.02, sh["extent"] - 0.06)
    bcol = _pick(rng, ("white", "white", "red", "blue"))
    for _ in range(n_b):
        ang = (0.0 if sh["side"] in ("left", "right") else math.pi / 2) + float(rng.normal(0, 0.2)) + math.pi * int(rng.integers(2))
        _add(s, p, rng, "ship", bcol, float(rng.uniform(0.07, 0.1)), 0.03, angle=ang, box=water_box, ok=lambda x, y, r: on_water_side(sh, x, y, 0.05))
    land_box = _shore_box(sh["side"], sh["extent"] + sh["sand"] + 0.03, 1.0)
    _scatter_trees(s, p, rng, int(rng.integers(3, 12)), box=land_box)
    if s.count("umbrella"):
        caps.append(_count_sentence(s, "umbrella", rng, "on the sand"))
        cb = _colour_breakdown(s, "umbrella", rng, "standing on the beach")
        if cb:
            caps.append(cb)
    else:
        caps.append(Caption("the sandy beach is empty .", [("count", "umbrella", None, 0)]))
    if s.count("ship"):
        caps.append(_count_sentence(s, "ship", rng, f"sailing on the {sea_name} near the beach", color=bcol))
    caps.append(Caption(f"green trees grow behind the {_pick(rng, ('yellow beach', 'sand'))} .", []))
    generic = ["a beach next to the sea .", "yellow sand along the blue sea .", "this is a beach seen from above .", "waves reach a long sandy beach ."]
    return s, caps, generic


def _build_farmland(rng):
    s = Scene("farmland", _jitter(_pick(rng, SOIL), rng))
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    gap = float(rng.uniform(0.015, 0.03))
    p = _Placer(rng)
    farm = (int(rng.integers(cols)), int(rng.integers(rows))) if rng.random() < 0.4 else None
    xs = np.sort(rng.uniform(0.2, 0.8, size=cols - 1)) if cols > 1 else np.array([])
    ys = np.sort(rng.uniform(0.2, 0.8, size=rows - 1)) if rows > 1 else np.array([])
    xe = [0.0, *[float(v) for v in xs], 1.0]
    ye = [0.0, *[float(v) for v in ys], 1.0]
    # re-space edges so every parcel is at least 0.18 wide
    xe = [i / cols for i in range(cols + 1)] if any(b - a < 0.18 for a, b in zip(xe, xe[1:])) else xe
    ye = [i / rows for i in range(rows + 1)] if any(b - a < 0.18 for a, b in zip(ye, ye[1:])) else ye
    for r in range(rows):
        for c in range(cols):
            x0, x1, y0, y1 = xe[c] + gap, xe[c + 1] - gap, ye[r] + gap, ye[r + 1] - gap
            if farm == (c, r):
                s.landmarks["farmyard"] = {"box": (x0, y0, x1, y1)}
                col = _pick(rng, ("red", "grey", "brown"))
                nb = int(rng.integers(1, 3))
                for _ in range(nb):
                    sz = float(rng.uniform(0.06, 0.09))
                    _add(s, p, rng, "building", col, sz, sz * 1.4, box=(x0, y0, x1, y1), pad=0.01)
                continue
            col = _pick(rng, tuple(FIELD_RGB))
            o = Obj("field", col, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, 0.0,
                    _jitter(FIELD_RGB[col], rng, 14))
            o.angle = float(_pick(rng, (0.0, math.pi / 2)))  # stripe direction
            s.objects.append(o)
            p.block(o.x, o.y, 0.0)
    caps: list[Caption] = []
    nf = s.count("field")
    ph, cl = count_phrase("field", nf, rng)
    caps.append(Caption(f"the farmland is divided into {ph} .", cl))
    cb = _colour_breakdown(s, "field", rng, "arranged side by side")
    if cb:
        caps.append(cb)
    for col in ("yellow", "green", "brown"):
        r = _region_sentence(s, "field", rng, col)
        if r and s.count("field", col) == 1:
            caps.append(r)
            break
    bs = s.of("building")
    if bs:
        ph, cl = count_phrase("building", len(bs), rng, bs[0].color)
        cell = _common_region(bs)
        if cell:
            caps.append(Caption(f"{ph} of a farm {_be(len(bs))} {_region_phrase(cell, rng)} between the fields .", cl + [("region", "building", bs[0].color, cell)]))
        else:
            caps.append(Caption(f"{ph} of a farm {_be(len(bs))} between the fields .", cl))
    generic = ["farmland divided into rectangular parcels .", "farmland seen from above .", "many pieces of farmland .", "this is a farmland area with striped fields ."]
    return s, caps, generic


def _build_forest(rng):
    shade = _pick(rng, tuple(_CANOPY))
    s = Scene("forest", _jitter(_dark(_CANOPY[shade][0], 0.85), rng, 6))
    s.landmarks["canopy"] = {"shade": shade}
    p = _Placer(rng)
    caps: list[Caption] = [Caption(f"the forest canopy is {shade} green .", [("landmark", "canopy", "shade", shade)])]
    ok = None
    if rng.random() < 0.5:
        rd = _band(rng, w=(0.05, 0.07), wiggle=0.05)
        s.landmarks["track"] = rd
        ok = _away_from_band(rd, 0.0)
        caps.append(Caption(f"a narrow road passes through the forest {_band_word(rd, rng)} .", [("landmark", "track", "orient", rd["orient"])]))
    if rng.random() < 0.4:
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        bx = _cell_box(cell, 0.05)
        pond = {"x": (bx[0] + bx[2]) / 2, "y": (bx[1] + bx[3]) / 2, "rx": float(rng.uniform(0.08, 0.12)), "ry": float(rng.uniform(0.07, 0.11)), "cell": cell}
        if ok is None or _away_from_band(s.landmarks["track"], 0.02)(pond["x"], pond["y"], max(pond["rx"], pond["ry"])):
            s.landmarks["pond"] = pond
            p.block(pond["x"], pond["y"], max(pond["rx"], pond["ry"]) + 0.02)
            caps.append(Caption(f"a small pond lies {_region_phrase(cell, rng)} of the forest .", [("landmark", "pond", "cell", cell)]))
    if rng.random() < 0.4:  # a clearing with a house
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        bx = _cell_box(cell, 0.07)
        cl = {"x": (bx[0] + bx[2]) / 2, "y": (bx[1] + bx[3]) / 2, "r": float(rng.uniform(0.08, 0.1)), "cell": cell}
        free = p.free(cl["x"], cl["y"], cl["r"], 0.03) and (ok is None or _away_from_band(s.landmarks["track"], 0.02)(cl["x"], cl["y"], cl["r"]))
        if free:
            s.landmarks["clearing"] = cl
            col = _pick(rng, ROOF_COLORS)
            sz = float(rng.uniform(0.06, 0.08))
            s.objects.append(Obj("house", col, cl["x"], cl["y"], sz, sz * 0.8, 0.0, _jitter(COLORS[col], rng, 10)))
            p.block(cl["x"], cl["y"], cl["r"])
            caps.append(Caption(f"a house with a {col} roof stands in a clearing {_region_phrase(cell, rng)} .",
                                [("count", "house", col, 1), ("region", "house", col, cell)]))
    # yellow (autumn) trees are placed first (exact count, drawn on top); the dense green canopy
    # fills a jittered grid around them (no rejection sampling: hundreds of crowns)
    n_y = int(rng.integers(0, 6))
    yellow = []
    for _ in range(n_y):
        sz = float(rng.uniform(0.06, 0.08))
        r = sz / 2
        pos = p.place(r, ok=ok, pad=0.01)
        if pos is not None:
            yellow.append(Obj("tree", "yellow", pos[0], pos[1], sz, sz, 0.0, _jitter((196, 170, 54), rng, 10)))
    step = 0.055
    n = int(1 / step) + 1
    jit = rng.uniform(-0.4, 0.4, size=(n, n, 2)) * step
    sizes = rng.uniform(0.05, 0.085, size=(n, n))
    greens = rng.integers(len(TREE_GREEN), size=(n, n))
    for a in range(n):
        for b in range(n):
            x, y, sz = (a + 0.5) * step + jit[a, b, 0], (b + 0.5) * step + jit[a, b, 1], float(sizes[a, b])
            if ok is not None and not ok(x, y, 0.0):
                continue
            if not p.free(x, y, 0.0, 0.015):
                continue
            s.objects.append(Obj("tree", "green", float(x), float(y), sz, sz, 0.0, _jitter(_CANOPY[shade][int(greens[a, b]) % 3], rng, 6)))
    s.objects.extend(yellow)
    if n_y and s.count("tree", "yellow"):
        ny = s.count("tree", "yellow")
        ph, cl = count_phrase("tree", ny, rng, "yellow")
        caps.append(Caption(f"{ph} {_be(ny)} scattered among the green ones .", cl))
        r = _region_sentence(s, "tree", rng, "yellow")
        if r:
            caps.append(r)
    else:
        caps.append(Caption("all the trees in the forest are green .", [("count", "tree", "yellow", 0)]))
    generic = ["a dense forest .", "many green trees grow densely together .", "this is a piece of forest seen from above .", "lots of trees form a green forest ."]
    return s, caps, generic


def _build_industrial(rng):
    s = Scene("industrial", _jitter(_pick(rng, (CONCRETE, (160, 156, 146), (150, 146, 140))), rng))
    rd = _band(rng, w=(0.08, 0.11), c=(0.35, 0.65))
    s.landmarks["road"] = rd
    p = _Placer(rng)
    away = _away_from_band(rd, 0.02)
    nb = int(rng.integers(2, 7))
    roof = ("white", "grey", "blue")
    for _ in range(nb):
        w, h = float(rng.uniform(0.14, 0.24)), float(rng.uniform(0.1, 0.18))
        _add(s, p, rng, "building", _pick(rng, roof), w, h, ok=away, pad=0.015)
    nt = int(rng.integers(0, 4))
    for _ in range(nt):
        d = float(rng.uniform(0.07, 0.1))
        _add(s, p, rng, "tank", "white", d, d, ok=away, pad=0.01)
    nc = int(rng.integers(0, 7))
    ang = 0.0 if rd["orient"] == "horizontal" else math.pi / 2
    for _ in range(nc):
        _add(s, p, rng, "car", _pick(rng, CAR_COLORS), 0.05, 0.025, angle=ang, ok=_on_band(rd, 0.012), pad=0.004)
    caps = [Caption(f"a road runs {_band_word(rd, rng)} through the industrial area .", [("landmark", "road", "orient", rd["orient"])])]
    ph, cl = count_phrase("building", s.count("building"), rng)
    sides = {side_of_band(rd, b) for b in s.of("building")}
    caps.append(Caption(f"{ph} {_be(s.count('building'))} on both sides of the road ." if len(sides) > 1
                        else f"{ph} {_be(s.count('building'))} on one side of the road .", cl))
    roofs = _color_counts(s.of("building"))
    parts = [f"{_num(n)} {col} roof{'s' if n > 1 else ''}" for col, n in roofs.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caps.append(Caption(f"the factories have {text} .", [("count", "building", col, n) for col, n in roofs.items()]))
    if s.count("tank"):
        caps.append(_count_sentence(s, "tank", rng, "next to the factories"))
    if s.count("car"):
        caps.append(_count_sentence(s, "car", rng, "driving on the road"))
    else:
        caps.append(Caption("there are no vehicles on the road .", [("count", "car", None, 0)]))
    generic = ["an industrial area with several factories .", "large buildings in an industrial area .", "this is an industrial zone .", "an aerial image of an industrial area ."]
    return s, caps, generic


def _build_junction(rng):
    s = Scene("junction", _jitter(_pick(rng, GRASS), rng))
    h = _band(rng, "horizontal", w=(0.12, 0.16), c=(0.35, 0.65))
    v = _band(rng, "vertical", w=(0.12, 0.16), c=(0.35, 0.65))
    tee = rng.random() < 0.4
    v["tee"] = tee
    if tee:  # the vertical road stops at the horizontal one, coming from the top or the bottom
        v["stop"] = _pick(rng, ("top", "bottom"))
    s.landmarks["road_h"] = h
    s.landmarks["road_v"] = v
    p = _Placer(rng)
    nc = int(rng.integers(0, 11))
    for _ in range(nc):
        col = _pick(rng, CAR_COLORS)
        if rng.random() < 0.55:
            _add(s, p, rng, "car", col, 0.05, 0.026, angle=0.0, ok=_on_band(h, 0.015), pad=0.005)
        else:
            def ok(x, y, r=0.0, v=v):
                if not _on_band(v, 0.015)(x, y):
                    return False
                if "stop" in v:
                    return y < h["c"] if v["stop"] == "top" else y > h["c"]
                return True
            _add(s, p, rng, "car", col, 0.05, 0.026, angle=math.pi / 2, ok=ok, pad=0.005)

    def off_road(x, y, r=0.0):
        return _away_from_band(h, 0.01)(x, y, r) and _away_from_band(v, 0.01)(x, y, r)

    nb = int(rng.integers(0, 5))
    roof = _pick(rng, ROOF_COLORS)
    for _ in range(nb):
        sz = float(rng.uniform(0.08, 0.12))
        _add(s, p, rng, "building", roof, sz, sz * float(rng.uniform(0.8, 1.4)), ok=off_road, pad=0.02)
    _scatter_trees(s, p, rng, int(rng.integers(2, 10)), ok=off_road)
    caps = [Caption("two roads meet at a t-shaped junction ." if tee else "two roads cross each other at a crossroads .", [("landmark", "road_v", "tee", tee)])]
    if tee:
        caps.append(Caption(f"a road from the {v['stop']} joins a horizontal road .", [("landmark", "road_v", "stop", v["stop"])]))
    if s.count("car"):
        caps.append(_count_sentence(s, "car", rng, _pick(rng, ("on the roads", "driving through the junction"))))
        cb = _colour_breakdown(s, "car", rng, "on the road")
        if cb:
            caps.append(cb)
    else:
        caps.append(Caption("there are no cars on the roads .", [("count", "car", None, 0)]))
    if s.count("building"):
        nb_ = s.count("building")
        ph, cl = count_phrase("building", nb_, rng, roof)
        caps.append(Caption(f"{ph} {_be(nb_)} near the corners of the intersection .", cl))
    generic = ["an intersection of two roads .", "a road junction surrounded by green grass .", "this is a road intersection seen from above .", "roads meet at a junction ."]
    return s, caps, generic


def _build_lake(rng):
    s = Scene("lake", _jitter(_pick(rng, GRASS), rng))
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    cx = (cell[0] + 0.5) / 3 + float(rng.uniform(-0.04, 0.04))
    cy = (cell[1] + 0.5) / 3 + float(rng.uniform(-0.04, 0.04))
    rx, ry = float(rng.uniform(0.17, 0.28)), float(rng.uniform(0.15, 0.26))
    lake = {"x": cx, "y": cy, "rx": rx, "ry": ry, "cell": cell, "wob": [float(v) for v in rng.uniform(-0.12, 0.12, size=8)]}
    s.landmarks["lake"] = lake
    p = _Placer(rng)

    def in_lake(x, y, m=0.0):
        return ((x - cx) / (rx - m)) ** 2 + ((y - cy) / (ry - m)) ** 2 < 1

    nb = int(rng.integers(0, 4))
    bcol = _pick(rng, ("white", "white", "red", "yellow"))
    for _ in range(nb):
        _add(s, p, rng, "ship", bcol, float(rng.uniform(0.05, 0.07)), 0.025, angle=float(rng.uniform(0, math.pi)),
             ok=lambda x, y, r: in_lake(x, y, 0.06), pad=0.01)
    nh = int(rng.integers(0, 4))
    hcol = _pick(rng, ROOF_COLORS)
    for _ in range(nh):
        sz = float(rng.uniform(0.06, 0.09))
        _add(s, p, rng, "house", hcol, sz, sz, ok=lambda x, y, r: not in_lake(x, y, -0.15), pad=0.02)
    _scatter_trees(s, p, rng, int(rng.integers(8, 30)), ok=lambda x, y, r: not in_lake(x, y, -0.12))
    name = _pick(rng, ("lake", "pond"))
    caps = [Caption(f"a {_pick(rng, ('blue', 'large', 'calm'))} {name} {_region_phrase(cell, rng)} is surrounded by green land .", [("landmark", "lake", "cell", cell)])]
    if s.count("ship"):
        caps.append(_count_sentence(s, "ship", rng, f"on the {name}", color=bcol))
    else:
        caps.append(Caption(f"there are no boats on the {name} .", [("count", "ship", None, 0)]))
    nh = s.count("house")
    if nh:
        ph, cl = count_phrase("house", nh, rng)
        roofs = f"{hcol} roofs" if nh > 1 else f"a {hcol} roof"
        caps.append(Caption(f"{ph} with {roofs} {_be(nh)} near the {name} .", cl + [("count", "house", hcol, nh)]))
    caps.append(Caption(f"some trees grow around the {name} .", []))
    generic = ["a lake surrounded by green grass and trees .", "blue water of a lake .", "this is a lake seen from above .", "a pond in a green meadow ."]
    return s, caps, generic


def _build_parking(rng):
    s = Scene("parking", _jitter(_pick(rng, GRASS), rng))
    x0, y0 = float(rng.uniform(0.04, 0.12)), float(rng.uniform(0.04, 0.12))
    x1, y1 = float(rng.uniform(0.88, 0.96)), float(rng.uniform(0.88, 0.96))
    rows = int(rng.integers(2, 5))
    orient = _pick(rng, ("horizontal", "vertical"))
    lot = {"box": (x0, y0, x1, y1), "rows": rows, "orient": orient}
    s.landmarks["lot"] = lot
    # slots: rows of stalls along the lot's long axis
    slot_w = 0.05
    slots = []
    span = (x1 - x0) if orient == "horizontal" else (y1 - y0)
    across = (y1 - y0) if orient == "horizontal" else (x1 - x0)
    n_per = int((span - 0.04) / (slot_w + 0.012))
    for r in range(rows):
        a = (r + 0.5) / rows * across + (y0 if orient == "horizontal" else x0)
        for k in range(n_per):
            b = (x0 if orient == "horizontal" else y0) + 0.02 + (k + 0.5) * (slot_w + 0.012)
            slots.append((b, a) if orient == "horizontal" else (a, b))
    lot["slots"] = slots
    n = int(rng.integers(2, min(len(slots), 22) + 1))
    chosen = sorted(rng.choice(len(slots), size=n, replace=False).tolist())
    ang = math.pi / 2 if orient == "horizontal" else 0.0
    for i in chosen:
        x, y = slots[i]
        col = _pick(rng, CAR_COLORS)
        s.objects.append(Obj("car", col, x, y, 0.055, 0.028, ang, _jitter(COLORS[col], rng, 10)))
    p = _Placer(rng)
    p.block(0.5, 0.5, 0.0)
    _scatter_trees(s, p, rng, int(rng.integers(0, 8)), ok=lambda x, y, r: not (x0 - 0.03 < x < x1 + 0.03 and y0 - 0.03 < y < y1 + 0.03), size=(0.03, 0.045))
    caps: list[Caption] = []
    cars = s.of("car")
    ph, cl = count_phrase("car", len(cars), rng)
    caps.append(Caption(f"{ph} {_be(len(cars))} parked in the parking lot .", cl))
    full = len(cars) / len(slots)
    if full < 0.3:
        caps.append(Caption("the parking lot is mostly empty .", []))
    elif full > 0.7:
        caps.append(Caption("the parking lot is almost full .", []))
    cb = _colour_breakdown(s, "car", rng, "parked here")
    if cb:
        caps.append(cb)
    for col in CAR_COLORS:
        objs = s.of("car", col)
        if len(objs) == 1:
            r = _region_sentence(s, "car", rng, col)
            if r:
                caps.append(r)
                break
    caps.append(Caption(f"the parking spaces are arranged in {_num(rows)} rows .", [("landmark", "lot", "rows", rows)]))
    generic = ["a parking lot with cars .", "cars are parked in a parking lot .", "this is a parking lot seen from above .", "a large parking area with white lines ."]
    return s, caps, generic


def _build_port(rng):
    s = Scene("port", _jitter(CONCRETE, rng, 14))
    sh = _shore(rng)
    sh["extent"] = float(rng.uniform(0.38, 0.5))
    sh["amp"] = 0.0
    s.landmarks["water"] = sh
    p = _Placer(rng)
    npier = int(rng.integers(1, 4))
    piers = []
    for k in range(npier):
        t = (k + 0.5) / npier + float(rng.uniform(-0.05, 0.05))
        piers.append({"t": t, "len": float(rng.uniform(0.45, 0.8)) * sh["extent"], "w": 0.05})
    sh["piers"] = piers
    sh["n_piers"] = npier
    for pr in piers:  # keep ships off the piers
        along = sh["extent"] - pr["len"] / 2
        if sh["side"] in ("left", "right"):
            x = along if sh["side"] == "left" else 1 - along
            for k in range(5):
                xx = x - pr["len"] / 2 + (k + 0.5) * pr["len"] / 5
                p.block(xx, pr["t"], 0.04)
        else:
            y = along if sh["side"] == "top" else 1 - along
            for k in range(5):
                yy = y - pr["len"] / 2 + (k + 0.5) * pr["len"] / 5
                p.block(pr["t"], yy, 0.04)
    ns = int(rng.integers(1, 7))
    horiz = sh["side"] in ("left", "right")
    for _ in range(ns):
        L = float(rng.uniform(0.1, 0.17))
        ang = (0.0 if horiz else math.pi / 2) + math.pi * int(rng.integers(2))
        _add(s, p, rng, "ship", _pick(rng, SHIP_COLORS), L, L * 0.28, angle=ang,
             ok=lambda x, y, r: on_water_side(sh, x, y, 0.06), pad=0.01)
    land = _shore_box(sh["side"], sh["extent"] + 0.04, 1.0)
    nc = int(rng.integers(0, 9))
    ccol = ("red", "blue", "orange", "green")
    for _ in range(nc):
        _add(s, p, rng, "container", _pick(rng, ccol), 0.07, 0.03, angle=0.0 if horiz else math.pi / 2, box=land, pad=0.008)
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 4))):
            d = float(rng.uniform(0.07, 0.1))
            _add(s, p, rng, "tank", "white", d, d, box=land, pad=0.01)
    caps = [Caption(f"the water of the harbour is {_EDGE_PHRASE[sh['side']]} .", [("landmark", "water", "side", sh["side"])])]
    caps.append(_count_sentence(s, "ship", rng, _pick(rng, ("docked in the port", "moored near the piers", "in the harbour"))))
    cb = _colour_breakdown(s, "ship", rng, "in the port")
    if cb:
        caps.append(cb)
    if s.count("container"):
        caps.append(_count_sentence(s, "container", rng, "stacked on the quay"))
    if s.count("tank"):
        caps.append(_count_sentence(s, "tank", rng, "on the land next to the port"))
    caps.append(Caption(f"{_num(npier) if npier > 1 else 'a'} {'piers extend' if npier > 1 else 'pier extends'} into the water .", [("landmark", "water", "n_piers", npier)]))
    generic = ["a port with ships and piers .", "boats in a harbour .", "this is a port seen from above .", "ships are docked at a port ."]
    return s, caps, generic


def _build_residential(rng):
    s = Scene("residential", _jitter(_pick(rng, GRASS), rng))
    rd = _band(rng, w=(0.09, 0.12), c=(0.38, 0.62))
    s.landmarks["road"] = rd
    p = _Placer(rng)
    n_target = int(rng.integers(3, 13))
    main = _pick(rng, ROOF_COLORS)
    off = _away_from_band(rd, 0.015)
    for _ in range(n_target):
        col = main if rng.random() < 0.55 else _pick(rng, ROOF_COLORS)
        sz = float(rng.uniform(0.08, 0.12))
        ang = 0.0 if rd["orient"] == "vertical" else math.pi / 2
        _add(s, p, rng, "house", col, sz, sz * float(rng.uniform(0.7, 1.0)), angle=ang, ok=off, pad=0.025)
    ang = 0.0 if rd["orient"] == "horizontal" else math.pi / 2
    for _ in range(int(rng.integers(0, 6))):
        _add(s, p, rng, "car", _pick(rng, CAR_COLORS), 0.05, 0.025, angle=ang, ok=_on_band(rd, 0.012), pad=0.004)
    _scatter_trees(s, p, rng, int(rng.integers(4, 16)), ok=off, size=(0.03, 0.055))
    caps = [Caption(f"a road runs {_band_word(rd, rng)} through the residential area .", [("landmark", "road", "orient", rd["orient"])])]
    nh = s.count("house")
    ph, cl = count_phrase("house", nh, rng)
    caps.append(Caption(f"{ph} {_be(nh)} built along the road .", cl))
    counts = _color_counts(s.of("house"))
    col, k = next(iter(counts.items()))
    caps.append(Caption(f"{_num(k)} of the houses have {col} roofs ." if k > 1 else f"only one of the houses has a {col} roof .", [("count", "house", col, k)]))
    for col in counts:
        sides = {side_of_band(rd, o) for o in s.of("house", col)}
        if len(sides) == 1 and None not in sides:
            ph, cl = count_phrase("house", counts[col], rng)
            roofs = f"{col} roofs" if counts[col] > 1 else f"a {col} roof"
            sd = sides.pop()
            caps.append(Caption(f"{ph} with {roofs} {_be(counts[col])} {_side_phrase(sd, 'road')} .",
                                [("count", "house", col, counts[col]), ("side", "house", col, "road", sd)]))
            break
    if s.count("car"):
        caps.append(_count_sentence(s, "car", rng, "on the road"))
    generic = ["a residential area with houses and trees .", "houses in a residential area .", "this is a residential area seen from above .", "houses with green trees around them ."]
    return s, caps, generic


def _build_river(rng):
    s = Scene("river", _jitter(_pick(rng, GRASS), rng))
    rv = _band(rng, w=(0.13, 0.2), wiggle=0.06, c=(0.38, 0.62))
    s.landmarks["river"] = rv
    p = _Placer(rng)
    caps = [Caption(f"a {_pick(rng, ('winding', 'wide', 'blue'))} river flows {_band_word(rv, rng)} .", [("landmark", "river", "orient", rv["orient"])])]
    if rng.random() < 0.4:
        t = float(rng.uniform(0.25, 0.75))
        rv["has_bridge"] = True
        caps.append(Caption("a bridge crosses the river .", [("landmark", "river", "has_bridge", True)]))
        br = {"orient": "horizontal" if rv["orient"] == "vertical" else "vertical", "c": t, "w": 0.05}
        s.landmarks["bridge"] = br
        p.block(*((band_center(rv, t), t) if rv["orient"] == "vertical" else (t, band_center(rv, t))), 0.08)
    side = _pick(rng, _band_sides(rv))
    col = _pick(rng, ROOF_COLORS)

    def on_side(x, y, r=0.0):
        return side_of_band(rv, Obj("building", col, x, y, 2 * r, 0.0)) == side

    nb = int(rng.integers(0, 6))
    for _ in range(nb):
        sz = float(rng.uniform(0.07, 0.1))
        _add(s, p, rng, "building", col, sz, sz, ok=on_side, pad=0.02)
    nboat = int(rng.integers(0, 3))
    ang = math.pi / 2 if rv["orient"] == "vertical" else 0.0
    for _ in range(nboat):
        _add(s, p, rng, "ship", "white", 0.06, 0.022, angle=ang, ok=_on_band(rv, 0.035), pad=0.02)
    _scatter_trees(s, p, rng, int(rng.integers(5, 18)), ok=_away_from_band(rv, 0.01))
    if s.count("building"):
        n = s.count("building")
        ph, cl = count_phrase("building", n, rng, col)
        caps.append(Caption(f"{ph} {_be(n)} {_side_phrase(side, 'river')} .", cl + [("side", "building", col, "river", side)]))
    else:
        caps.append(Caption("there are no buildings near the river .", [("count", "building", None, 0)]))
    if s.count("ship"):
        caps.append(_count_sentence(s, "ship", rng, "on the river", color="white"))
    caps.append(Caption("green trees grow on both banks of the river ." if len({side_of_band(rv, t) for t in s.of("tree")} - {None}) == 2
                        else "some trees grow along the river .", []))
    generic = ["a river passes through green land .", "a river with trees on its banks .", "this is a river seen from above .", "blue water flows in a river ."]
    return s, caps, generic


def _build_stadium(rng):
    s = Scene("stadium", _jitter(_pick(rng, GRASS + (CONCRETE,)), rng))
    cell = _pick(rng, ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2)))
    cx = 0.5 + (cell[0] - 1) * 0.2
    cy = 0.5 + (cell[1] - 1) * 0.2
    horiz = rng.random() < 0.5
    rx, ry = (0.3, 0.2) if horiz else (0.2, 0.3)
    track_col = _pick(rng, ("red", "red", "blue", "brown"))
    st = {"x": cx, "y": cy, "rx": rx, "ry": ry, "track": track_col, "cell": region_of(cx, cy)}
    s.landmarks["stadium"] = st
    p = _Placer(rng)
    p.block(cx, cy, max(rx, ry) + 0.06)
    nc = int(rng.integers(0, 9))
    for _ in range(nc):
        _add(s, p, rng, "car", _pick(rng, CAR_COLORS), 0.05, 0.025, angle=_pick(rng, (0.0, math.pi / 2)), pad=0.01)
    _scatter_trees(s, p, rng, int(rng.integers(0, 8)), size=(0.03, 0.045))
    track_word = track_col
    caps = [Caption(f"a stadium with a {track_word} running track around a green football field .", [("landmark", "stadium", "track", track_col)])]
    caps.append(Caption(f"the stadium is {_region_phrase(st['cell'], rng)} of the image .", [("landmark", "stadium", "cell", st["cell"])]))
    if nc and s.count("car"):
        caps.append(_count_sentence(s, "car", rng, "parked outside the stadium"))
    else:
        caps.append(Caption("no cars are parked around the stadium .", [("count", "car", None, 0)]))
    caps.append(Caption(f"the oval stadium is {'wider than it is tall' if horiz else 'taller than it is wide'} .", []))
    generic = ["a stadium with a playground .", "a large stadium seen from above .", "this is a sports stadium .", "a playground with a running track ."]
    return s, caps, generic


def _build_storagetanks(rng):
    s = Scene("storagetanks", _jitter(_pick(rng, SOIL + (CONCRETE,)), rng))
    p = _Placer(rng)
    rows, cols = int(rng.integers(1, 4)), int(rng.integers(2, 4))
    d = float(rng.uniform(0.14, 0.2)) if rows * cols <= 4 else float(rng.uniform(0.11, 0.15))
    ox, oy = float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05))
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.15:
                continue
            x = 0.5 + ox + (c - (cols - 1) / 2) * (d + 0.06)
            y = 0.5 + oy + (r - (rows - 1) / 2) * (d + 0.06)
            col = "white" if rng.random() < 0.7 else "grey"
            s.objects.append(Obj("tank", col, x, y, d, d, 0.0, _jitter(COLORS[col], rng, 8)))
            p.block(x, y, d / 2)
    if not s.objects:
        s.objects.append(Obj("tank", "white", 0.5, 0.5, d, d, 0.0, _jitter(COLORS["white"], rng, 8)))
        p.block(0.5, 0.5, d / 2)
    nb = int(rng.integers(0, 3))
    for _ in range(nb):
        _add(s, p, rng, "building", "grey", float(rng.uniform(0.1, 0.15)), float(rng.uniform(0.06, 0.09)), pad=0.02)
    _scatter_trees(s, p, rng, int(rng.integers(0, 6)), size=(0.03, 0.045))
    caps = []
    caps.append(_count_sentence(s, "tank", rng, _pick(rng, ("in the tank farm", "close to each other", "arranged neatly"))))
    cb = _colour_breakdown(s, "tank", rng, "standing on the ground")
    if cb:
        caps.append(cb)
    used_rows = len({round(o.y, 3) for o in s.of("tank")})
    if used_rows > 1:
        caps.append(Caption(f"the tanks are arranged in {_num(used_rows)} rows .", [("landmark", "tanks", "rows", used_rows)]))
        s.landmarks["tanks"] = {"rows": used_rows}
    else:
        caps.append(Caption("the tanks stand in a single row .", [("landmark", "tanks", "rows", 1)]))
        s.landmarks["tanks"] = {"rows": 1}
    if s.count("building"):
        caps.append(_count_sentence(s, "building", rng, "next to the tanks", color="grey"))
    generic = ["some storage tanks .", "round storage tanks seen from above .", "this is an oil depot with storage tanks .", "an area with cylindrical tanks ."]
    return s, caps, generic


BUILDERS: dict[str, Callable] = {
    "airport": _build_airport, "bareland": _build_bareland, "beach": _build_beach, "farmland": _build_farmland,
    "forest": _build_forest, "industrial": _build_industrial, "junction": _build_junction, "lake": _build_lake,
    "parking": _build_parking, "port": _build_port, "residential": _build_residential, "river": _build_river,
    "stadium": _build_stadium, "storagetanks": _build_storagetanks,
}
assert set(BUILDERS) == set(CLASSES)


def make_scene(cls: str, rng: np.random.Generator) -> tuple[Scene, list[Caption]]:
    """Draw a scene of class ``cls`` and its 5 captions (1-2 generic, the rest detailed)."""
    scene, details, generic = BUILDERS[cls](rng)
    details = [c for c in details if c is not None]
    n_generic = 1 if rng.random() < 0.6 else 2
    n_detail = min(len(details), CAPTIONS_PER_IMAGE - n_generic)
    pick_d = sorted(rng.choice(len(details), size=n_detail, replace=False).tolist()) if n_detail else []
    gen_order = rng.permutation(len(generic)).tolist()
    caps = [details[i] for i in pick_d]
    seen = {c.text for c in caps}
    for i in gen_order:
        if len(caps) >= CAPTIONS_PER_IMAGE:
            break
        if generic[i] not in seen:
            caps.append(Caption(generic[i], []))
            seen.add(generic[i])
    order = rng.permutation(len(caps)).tolist()
    return scene, [caps[i] for i in order]


# -- rendering ---------------------------------------------------------------------------------
def _rot_poly(cx, cy, pts, ang, S):
    c, s = math.cos(ang), math.sin(ang)
    return [((cx + px * c - py * s) * S, (cy + px * s + py * c) * S) for px, py in pts]


def _rect_pts(w, h, dx=0.0, dy=0.0):
    return [(dx - w / 2, dy - h / 2), (dx + w / 2, dy - h / 2), (dx + w / 2, dy + h / 2), (dx - w / 2, dy + h / 2)]


def _dark(rgb, f=0.6):
    return tuple(int(c * f) for c in rgb)


def _light(rgb, f=0.25):
    return tuple(int(c + (255 - c) * f) for c in rgb)


def _band_poly(lm: dict, S: int, n: int = 24, w: float | None = None, t0: float = -0.05, t1: float = 1.05):
    w = lm["w"] if w is None else w
    ts = np.linspace(t0, t1, n)
    a = [(band_center(lm, float(t)) - w / 2, float(t)) for t in ts]
    b = [(band_center(lm, float(t)) + w / 2, float(t)) for t in ts[::-1]]
    pts = a + b
    if lm["orient"] == "vertical":
        return [(x * S, y * S) for x, y in pts]
    return [(y * S, x * S) for x, y in pts]


def _band_line(lm: dict, S: int, offset: float = 0.0, n: int = 24, t0: float = -0.05, t1: float = 1.05):
    ts = np.linspace(t0, t1, n)
    pts = [(band_center(lm, float(t)) + offset, float(t)) for t in ts]
    if lm["orient"] == "vertical":
        return [(x * S, y * S) for x, y in pts]
    return [(y * S, x * S) for x, y in pts]


def _dashes(d: ImageDraw.ImageDraw, pts, color, width, dash=3):
    for i in range(0, len(pts) - 1, 2 * dash // 3 or 2):
        if (i // 2) % 2 == 0:
            d.line([pts[i], pts[i + 1]], fill=color, width=width)


def _draw_road(d, lm, S, color=ASPHALT, marking=(230, 230, 220), t0=-0.05, t1=1.05, lanes=True):
    d.polygon(_band_poly(lm, S, t0=t0, t1=t1), fill=color)
    if lanes:
        lw = max(1, S // 128)
        _dashes(d, _band_line(lm, S, 0.0, n=40, t0=t0, t1=t1), marking, lw)
        for off in (-lm["w"] / 2 + 0.012, lm["w"] / 2 - 0.012):
            d.line(_band_line(lm, S, off, n=24, t0=t0, t1=t1), fill=_light(color, 0.35), width=lw)


def _water_texture(d, box_pts_fn, rng, S, base, n=14):
    for _ in range(n):
        x, y = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
        if box_pts_fn(x, y):
            L = float(rng.uniform(0.03, 0.08))
            d.line([(x * S, y * S), ((x + L) * S, (y + 0.004) * S)], fill=_light(base, 0.12), width=1)


def _draw_obj(d: ImageDraw.ImageDraw, o: Obj, S: int, bg) -> None:
    sh = 0.012 if o.kind in ("building", "house", "tank", "airplane", "container") else 0.006
    k = o.kind
    if k == "tree":
        r = o.w / 2
        d.ellipse([((o.x - r + 0.008) * S), ((o.y - r + 0.008) * S), ((o.x + r + 0.008) * S), ((o.y + r + 0.008) * S)], fill=_dark(bg, 0.45))
        d.ellipse([((o.x - r) * S), ((o.y - r) * S), ((o.x + r) * S), ((o.y + r) * S)], fill=o.rgb)
        r2 = r * 0.45
        d.ellipse([((o.x - r2 - r * 0.2) * S), ((o.y - r2 - r * 0.2) * S), ((o.x + r2 - r * 0.2) * S), ((o.y + r2 - r * 0.2) * S)], fill=_light(o.rgb, 0.12))
    elif k in ("tank", "umbrella"):
        r = o.w / 2
        if k == "tank":
            d.ellipse([((o.x - r + sh) * S), ((o.y - r + sh) * S), ((o.x + r + sh) * S), ((o.y + r + sh) * S)], fill=_dark(bg, 0.5))
        d.ellipse([((o.x - r) * S), ((o.y - r) * S), ((o.x + r) * S), ((o.y + r) * S)], fill=o.rgb)
        if k == "tank":
            r2 = r * 0.7
            d.ellipse([((o.x - r2) * S), ((o.y - r2) * S), ((o.x + r2) * S), ((o.y + r2) * S)], outline=_dark(o.rgb, 0.8), width=max(1, S // 128))
        else:
            d.line([((o.x - r) * S, o.y * S), ((o.x + r) * S, o.y * S)], fill=_dark(o.rgb, 0.8), width=1)
    elif k in ("building", "house", "container", "car"):
        pts = _rect_pts(o.w, o.h)
        if k != "car":
            d.polygon(_rot_poly(o.x + sh, o.y + sh, pts, o.angle, S), fill=_dark(bg, 0.5))
        d.polygon(_rot_poly(o.x, o.y, pts, o.angle, S), fill=o.rgb)
        if k == "house":  # roof ridge: the two slopes differ in brightness
            half = [(-o.w / 2, 0.0), (o.w / 2, 0.0), (o.w / 2, o.h / 2), (-o.w / 2, o.h / 2)]
            d.polygon(_rot_poly(o.x, o.y, half, o.angle, S), fill=_dark(o.rgb, 0.8))
        elif k == "building":
            d.polygon(_rot_poly(o.x, o.y, _rect_pts(o.w * 0.8, o.h * 0.7), o.angle, S), outline=_dark(o.rgb, 0.85))
        elif k == "car":  # windscreen
            d.polygon(_rot_poly(o.x, o.y, _rect_pts(o.w * 0.25, o.h * 0.8, dx=o.w * 0.12), o.angle, S), fill=_dark(o.rgb, 0.55))
    elif k == "ship":
        L, W = o.w, o.h
        hull = [(-L / 2, -W / 2), (L / 4, -W / 2), (L / 2, 0.0), (L / 4, W / 2), (-L / 2, W / 2)]
        d.polygon(_rot_poly(o.x + 0.006, o.y + 0.006, hull, o.angle, S), fill=_dark(bg, 0.7))
        d.polygon(_rot_poly(o.x, o.y, hull, o.angle, S), fill=o.rgb)
        cabin = _rect_pts(L * 0.22, W * 0.6, dx=-L * 0.25)
        d.polygon(_rot_poly(o.x, o.y, cabin, o.angle, S), fill=_light(o.rgb, 0.4) if o.color != "white" else (170, 170, 170))
    elif k == "airplane":
        L = o.w
        parts = [_rect_pts(L, L * 0.12), _rect_pts(L * 0.18, L * 0.95, dx=L * 0.05), _rect_pts(L * 0.1, L * 0.38, dx=-L * 0.42)]
        for pts in parts:
            d.polygon(_rot_poly(o.x + sh, o.y + sh, pts, o.angle, S), fill=_dark(bg, 0.5))
        for pts in parts:
            d.polygon(_rot_poly(o.x, o.y, pts, o.angle, S), fill=o.rgb)
    elif k == "field":
        x0, y0, x1, y1 = (o.x - o.w / 2) * S, (o.y - o.h / 2) * S, (o.x + o.w / 2) * S, (o.y + o.h / 2) * S
        d.rectangle([x0, y0, x1, y1], fill=o.rgb)
        stripe = _dark(o.rgb, 0.86)
        step = max(2, S // 40)
        if o.angle == 0.0:
            for yy in np.arange(y0 + 1, y1, step):
                d.line([(x0, yy), (x1, yy)], fill=stripe, width=1)
        else:
            for xx in np.arange(x0 + 1, x1, step):
                d.line([(xx, y0), (xx, y1)], fill=stripe, width=1)


def _noise_field(rng: np.random.Generator, S: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((S, S), Image.BICUBIC), dtype=np.float32)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene as an ``size`` x ``size`` RGB tile (deterministic given ``rng``'s state)."""
    S = size
    img = Image.new("RGB", (S, S), scene.bg)
    d = ImageDraw.Draw(img)
    lm = scene.landmarks
    bg = scene.bg
    # ground patches: a few slightly different blobs for a less uniform background
    for _ in range(int(rng.integers(3, 8))):
        x, y, r = float(rng.uniform(0, 1)), float(rng.uniform(0, 1)), float(rng.uniform(0.08, 0.25))
        d.ellipse([(x - r) * S, (y - r * 0.7) * S, (x + r) * S, (y + r * 0.7) * S], fill=_jitter(bg, rng, 10))
    if "sea" in lm or "water" in lm:
        sh = lm.get("sea") or lm["water"]
        water = _jitter(_pick(rng, WATER), rng, 8)
        n = 40
        ts = np.linspace(0, 1, n)
        def edge_pts(ext):
            pts = []
            for t in ts:
                e = ext + sh.get("amp", 0.0) * math.sin(2 * math.pi * sh.get("freq", 1.0) * t + sh.get("phase", 0.0))
                pts.append({"left": (e, t), "right": (1 - e, t), "top": (t, e), "bottom": (t, 1 - e)}[sh["side"]])
            return pts
        corner = {"left": [(0, 1), (0, 0)], "right": [(1, 1), (1, 0)], "top": [(1, 0), (0, 0)], "bottom": [(1, 1), (0, 1)]}[sh["side"]]
        # shoreline from t=0 to t=1, closed through the two image corners on the water side
        if "sand" in sh:
            d.polygon([(x * S, y * S) for x, y in edge_pts(sh["extent"] + sh["sand"]) + corner], fill=_jitter(SAND, rng, 10))
        d.polygon([(x * S, y * S) for x, y in edge_pts(sh["extent"]) + corner], fill=water)
        if "sand" in sh:  # surf line
            d.line([(x * S, y * S) for x, y in edge_pts(sh["extent"] - 0.01)], fill=(225, 232, 236), width=max(1, S // 100))
        _water_texture(d, lambda x, y: on_water_side(sh, x, y, 0.02), rng, S, water, n=20)
        for pr in sh.get("piers", []):
            L, t, w = pr["len"], pr["t"], pr["w"]
            e = sh["extent"]
            box = {"left": (e - L, t - w / 2, e + 0.02, t + w / 2), "right": (1 - e - 0.02, t - w / 2, 1 - e + L, t + w / 2),
                   "top": (t - w / 2, e - L, t + w / 2, e + 0.02), "bottom": (t - w / 2, 1 - e - 0.02, t + w / 2, 1 - e + L)}[sh["side"]]
            d.rectangle([box[0] * S, box[1] * S, box[2] * S, box[3] * S], fill=_jitter(CONCRETE, rng, 6))
    if "farmyard" in lm:
        b = lm["farmyard"]["box"]
        d.rectangle([b[0] * S, b[1] * S, b[2] * S, b[3] * S], fill=_jitter(GRASS[0], rng, 8))
    if "apron" in lm:
        b = lm["apron"]["box"]
        d.rectangle([b[0] * S, b[1] * S, b[2] * S, b[3] * S], fill=_jitter((150, 150, 150), rng, 8))
    if "runway" in lm:
        rw = lm["runway"]
        d.polygon(_band_poly(rw, S), fill=_jitter((110, 110, 112), rng, 6))
        _dashes(d, _band_line(rw, S, 0.0, n=60), (240, 240, 240), max(1, S // 100))
        for off in (-rw["w"] / 2 + 0.01, rw["w"] / 2 - 0.01):
            d.line(_band_line(rw, S, off, n=4), fill=(225, 225, 225), width=max(1, S // 128))
    if "lake" in lm:
        L = lm["lake"]
        water = _jitter(_pick(rng, WATER), rng, 8)
        pts = []
        for k in range(48):
            a = 2 * math.pi * k / 48
            wob = 1 + sum(v * math.sin((j + 2) * a + j) for j, v in enumerate(L["wob"][:3])) / 3
            wob = min(1.0, wob)  # never outside the ellipse used for placement
            pts.append(((L["x"] + L["rx"] * wob * math.cos(a)) * S, (L["y"] + L["ry"] * wob * math.sin(a)) * S))
        d.polygon(pts, fill=_dark(bg, 0.8))
        d.polygon([((x - L["x"] * S) * 0.95 + L["x"] * S, (y - L["y"] * S) * 0.95 + L["y"] * S) for x, y in pts], fill=water)
        _water_texture(d, lambda x, y: ((x - L["x"]) / L["rx"]) ** 2 + ((y - L["y"]) / L["ry"]) ** 2 < 0.6, rng, S, water, n=12)
    if "clearing" in lm:
        C = lm["clearing"]
        d.ellipse([(C["x"] - C["r"]) * S, (C["y"] - C["r"]) * S, (C["x"] + C["r"]) * S, (C["y"] + C["r"]) * S], fill=_jitter((150, 140, 96), rng, 8))
    if "pond" in lm:
        P = lm["pond"]
        d.ellipse([(P["x"] - P["rx"]) * S, (P["y"] - P["ry"]) * S, (P["x"] + P["rx"]) * S, (P["y"] + P["ry"]) * S], fill=_jitter(_pick(rng, WATER), rng, 8))
    if "river" in lm:
        rv = lm["river"]
        d.polygon(_band_poly(rv, S, w=rv["w"] + 0.02, n=40), fill=_jitter(SOIL[0], rng, 8))
        water = _jitter(_pick(rng, WATER), rng, 8)
        d.polygon(_band_poly(rv, S, n=40), fill=water)
        _water_texture(d, _on_band(rv, 0.01), rng, S, water, n=16)
    if "bridge" in lm:
        br = lm["bridge"]
        rv = lm["river"]
        c0 = band_center(rv, br["c"])
        span = (c0 - rv["w"] / 2 - 0.06, c0 + rv["w"] / 2 + 0.06)
        _draw_road(d, br, S, color=(150, 150, 146), t0=span[0], t1=span[1], lanes=False)
    if "track" in lm:
        _draw_road(d, lm["track"], S, color=_jitter((176, 150, 110), rng, 8), lanes=False)
    for key in ("road", "road_h", "road_v"):
        if key in lm:
            rd = lm[key]
            t0, t1 = -0.05, 1.05
            if rd.get("stop") == "top":
                t1 = lm["road_h"]["c"]
            elif rd.get("stop") == "bottom":
                t0 = lm["road_h"]["c"]
            _draw_road(d, rd, S, color=_jitter(ASPHALT, rng, 6), t0=t0, t1=t1, lanes=key != "road_v" or "stop" not in rd)
    if "road_h" in lm:  # clear the crossing area of lane lines
        h, v = lm["road_h"], lm["road_v"]
        x0, x1 = v["c"] - v["w"] / 2, v["c"] + v["w"] / 2
        y0, y1 = h["c"] - h["w"] / 2, h["c"] + h["w"] / 2
        d.rectangle([x0 * S, y0 * S, x1 * S, y1 * S], fill=_jitter(ASPHALT, rng, 4))
    if "lot" in lm:
        L = lm["lot"]
        x0, y0, x1, y1 = L["box"]
        d.rectangle([x0 * S, y0 * S, x1 * S, y1 * S], fill=_jitter(ASPHALT, rng, 8))
        for (sx, sy) in L["slots"]:
            if L["orient"] == "horizontal":
                d.line([((sx - 0.031) * S, (sy - 0.035) * S), ((sx - 0.031) * S, (sy + 0.035) * S)], fill=(215, 215, 210), width=1)
            else:
                d.line([((sx - 0.035) * S, (sy - 0.031) * S), ((sx + 0.035) * S, (sy - 0.031) * S)], fill=(215, 215, 210), width=1)
    if "stadium" in lm:
        st = lm["stadium"]
        x, y, rx, ry = st["x"], st["y"], st["rx"], st["ry"]
        d.ellipse([(x - rx - 0.05) * S, (y - ry - 0.05) * S, (x + rx + 0.05) * S, (y + ry + 0.05) * S], fill=(150, 150, 154))
        d.ellipse([(x - rx - 0.02) * S, (y - ry - 0.02) * S, (x + rx + 0.02) * S, (y + ry + 0.02) * S], fill=(120, 120, 124))
        d.ellipse([(x - rx) * S, (y - ry) * S, (x + rx) * S, (y + ry) * S], fill=_jitter(COLORS[st["track"]], rng, 10))
        ix, iy = rx - 0.05, ry - 0.05
        d.ellipse([(x - ix) * S, (y - iy) * S, (x + ix) * S, (y + iy) * S], fill=_jitter((70, 150, 60), rng, 8))
        fx, fy = ix * 0.75, iy * 0.75
        d.rectangle([(x - fx) * S, (y - fy) * S, (x + fx) * S, (y + fy) * S], outline=(230, 230, 230))
        if rx > ry:
            d.line([(x * S, (y - fy) * S), (x * S, (y + fy) * S)], fill=(230, 230, 230))
        else:
            d.line([((x - fx) * S, y * S), ((x + fx) * S, y * S)], fill=(230, 230, 230))
    order = {"field": 0, "tank": 2, "building": 2, "house": 2, "container": 2, "umbrella": 3, "car": 3, "ship": 3, "airplane": 3, "tree": 4}
    for o in sorted(scene.objects, key=lambda o: order.get(o.kind, 3)):
        _draw_obj(d, o, S, bg)
    # texture: low-frequency illumination + medium grain + pixel noise
    arr = np.asarray(img, dtype=np.float32)
    light = 1.0 + 0.07 * _noise_field(rng, S, 5)
    grain = 7.0 * _noise_field(rng, S, max(4, S // 6))
    arr = arr * light[..., None] + grain[..., None] + rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


# -- dataset writer ------------------------------------------------------------------------------
def tokens_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())


def image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), 0x5717])


def generate(index: int, cls: str, seed: int, size: int) -> tuple[Scene, list[Caption], Image.Image]:
    """Scene, captions and tile of image ``index`` (what :func:`write_synth` writes for it)."""
    rng = image_rng(seed, index)
    scene, caps = make_scene(cls, rng)
    return scene, caps, render(scene, size, rng)


def plan(n_images: int, seed: int, splits: tuple[float, float, float]) -> list[tuple[str, str, str]]:
    """(filename, class, split) per image: classes in turn, splits by a seeded permutation."""
    if n_images < 3:
        raise ValueError(f"n_images must be at least 3 (one per split), got {n_images}")
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {splits}")
    tot = float(sum(splits))
    n_val = max(1, int(round(n_images * splits[1] / tot)))
    n_test = max(1, int(round(n_images * splits[2] / tot)))
    n_train = n_images - n_val - n_test
    if n_train < 1:
        raise ValueError(f"n_images={n_images} is too small for splits {splits}")
    counter: dict[str, int] = {}
    rows = []
    for i in range(n_images):
        cls = CLASSES[i % len(CLASSES)]
        counter[cls] = counter.get(cls, 0) + 1
        rows.append([f"{cls}_{counter[cls]}.png", cls, ""])
    perm = np.random.default_rng([int(seed), 0x5B17]).permutation(n_images)
    for rank, i in enumerate(perm.tolist()):
        rows[i][2] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return [tuple(r) for r in rows]  # type: ignore[misc]


def assign_noise(captions: list[list[str]], classes: list[str], splits: list[str], noise_frac: float, seed: int) -> list[list[bool]]:
    """Replace ``round(noise_frac * train captions)`` train captions in place; return the flags.

    A replacement is a caption of a random image of another class (2/3) or an unrelated sentence
    (1/3). At most :data:`MAX_NOISY_PER_IMAGE` per image, so the cap is 4/5 of the train captions."""
    flags = [[False] * len(c) for c in captions]
    if noise_frac <= 0:
        return flags
    if noise_frac > 1:
        raise ValueError(f"noise_frac must be in [0, 1], got {noise_frac}")
    rng = np.random.default_rng([int(seed), 0x0150])
    train = [i for i, s in enumerate(splits) if s == "train"]
    slots = [(i, k) for i in train for k in range(len(captions[i]))]
    want = int(round(noise_frac * len(slots)))
    cap = sum(min(MAX_NOISY_PER_IMAGE, len(captions[i])) for i in train)
    if want > cap:
        log.warning("noise_frac=%.3f asks for %d noisy captions; at most %d (4 per image) are replaced", noise_frac, want, cap)
        want = cap
    originals = [list(c) for c in captions]
    per_image: dict[int, int] = {}
    done = 0
    for j in rng.permutation(len(slots)).tolist():
        if done >= want:
            break
        i, k = slots[j]
        if per_image.get(i, 0) >= MAX_NOISY_PER_IMAGE:
            continue
        if rng.random() < 2 / 3:
            while True:
                other = int(rng.integers(len(captions)))
                if classes[other] != classes[i]:
                    break
            text = originals[other][int(rng.integers(len(originals[other])))]
        else:
            text = GENERIC_NOISE[int(rng.integers(len(GENERIC_NOISE)))]
        captions[i][k] = text
        flags[i][k] = True
        per_image[i] = per_image.get(i, 0) + 1
        done += 1
    return flags


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def write_synth(
    out_dir: str | os.PathLike,
    n_images: int = 600,
    seed: int = 0,
    noise_frac: float = 0.0,
    image_size: int = 128,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Write the synthetic benchmark to ``out_dir`` and return the path of its JSON annotation
    (``out_dir/dataset_synth.json``). See the module docstring for layout and guarantees."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if not 0.0 <= noise_frac <= 1.0:
        raise ValueError(f"noise_frac must be in [0, 1], got {noise_frac}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ann = out / "dataset_synth.json"
    if ann.exists():  # the old annotation must not outlive the images it describes
        ann.unlink()
    rows = plan(n_images, seed, tuple(splits))  # type: ignore[arg-type]
    tmp = out / f".images.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    def job(i: int) -> list[str]:
        name, cls, _ = rows[i]
        _, caps, img = generate(i, cls, seed, image_size)
        (tmp / name).write_bytes(_png_bytes(img))
        return [c.text for c in caps]

    n_workers = workers if workers and workers > 0 else min(8, os.cpu_count() or 1)
    try:
        from tqdm import tqdm

        bar = tqdm(total=n_images, desc="synth images", unit="img", disable=not progress, leave=False)
        if n_workers == 1 or n_images < 32:
            captions = []
            for i in range(n_images):
                captions.append(job(i))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                captions = []
                for c in pool.map(job, range(n_images)):
                    captions.append(c)
                    bar.update()
        bar.close()
        images_dir = out / "images"
        old = out / f".images.old-{os.getpid()}"
        if images_dir.exists():
            os.replace(images_dir, old)
        os.replace(tmp, images_dir)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    classes = [r[1] for r in rows]
    split_of = [r[2] for r in rows]
    flags = assign_noise(captions, classes, split_of, noise_frac, seed)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["filename", "class"])
    for name, cls, _ in rows:
        w.writerow([name, cls])
    atomic_write_text(out / "labels.csv", buf.getvalue())
    images = []
    sid = 0
    for i, (name, cls, split) in enumerate(rows):
        sents = []
        for text, noisy in zip(captions[i], flags[i]):
            sents.append({"raw": text, "tokens": tokens_of(text), "imgid": i, "sentid": sid, "noisy": noisy})
            sid += 1
        images.append({"filename": name, "imgid": i, "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents})
    atomic_write_json(ann, {"dataset": "synth", "images": images})
    log.info("synthetic benchmark: %d images (%d classes), %d captions (%d noisy) in %s (%.1fs)", n_images,
             len(set(classes)), sid, sum(map(sum, flags)), out, time.perf_counter() - t0)
    return ann


# -- CLI -------------------------------------------------------------------------------------------
def bench_dataset(out_dir: str | os.PathLike, n_images: int, noise_frac: float = 0.0, progress: bool = True) -> Path:
    """The synthetic benchmark a bench command uses when given no ``--data``: written once to
    ``out_dir/data`` (seed 0) and reused by later runs; returns its annotation path."""
    ann = Path(out_dir) / "data" / "dataset_synth.json"
    if ann.is_file():
        return ann
    print(f"generating a synthetic benchmark ({n_images} images" + (f", noise {noise_frac}" if noise_frac else "") + ") ...", flush=True)
    return write_synth(ann.parent, n_images=n_images, seed=0, noise_frac=noise_frac, progress=progress)


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (images/, labels.csv, dataset_synth.json)")
    parser.add_argument("--images", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-frac", type=float, default=0.0, help="fraction of train captions replaced by weakly related ones (marked noisy)")
    parser.add_argument("--size", type=int, default=128, help="tile size in pixels (default 128)")
    parser.add_argument("--splits", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--workers", type=int, default=None, help="drawing threads (default: CPU count, at most 8)")


def run_synth(args: argparse.Namespace) -> int:
    from rsitr.utils.errors import RsitrError

    try:
        splits = tuple(float(v) for v in str(args.splits).split(","))
    except ValueError:
        raise RsitrError(f"--splits: expected three comma-separated fractions, got {args.splits!r}") from None
    if len(splits) != 3:
        raise RsitrError(f"--splits: expected three comma-separated fractions, got {args.splits!r}")
    t0 = time.perf_counter()
    try:
        ann = write_synth(args.out, n_images=args.images, seed=args.seed, noise_frac=args.noise_frac, image_size=args.size,
                          splits=splits, workers=args.workers, progress=not getattr(args, "quiet", False))  # type: ignore[arg-type]
    except ValueError as exc:
        raise RsitrError(str(exc)) from None
    print(f"wrote {args.images} synthetic images ({len(CLASSES)} classes, {args.size}px) and {ann} in {time.perf_counter() - t0:.1f}s")
    return 0
