"""Placing things in a scene: non-overlapping objects (rejection sampling), bands and shores,
scattered trees. Every draw comes from the image's own generator, in a fixed order."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from rsitr.data.synth.palette import CAR_COLORS, COLORS, TREE_GREEN, jitter
from rsitr.data.synth.scene import Obj, Scene, on_band, pick

class Placer:
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


def cell_box(cell: tuple[int, int], margin: float = 0.01) -> tuple[float, float, float, float]:
    c, r = cell
    return c / 3 + margin, r / 3 + margin, (c + 1) / 3 - margin, (r + 1) / 3 - margin


def add_obj(scene: Scene, placer: Placer, rng, kind: str, color: str | None, w: float, h: float, *, angle: float = 0.0,
            box=(0.0, 0.0, 1.0, 1.0), ok=None, pad: float = 0.01, rgb=None, big: bool = False) -> Obj | None:
    r = 0.5 * math.hypot(w, h)
    pos = placer.place(r, box, ok, pad)
    if pos is None:
        return None
    base = rgb if rgb is not None else (COLORS[color] if color else (128, 128, 128))
    o = Obj(kind, color, pos[0], pos[1], w, h, angle, jitter(base, rng, 10), big)
    scene.objects.append(o)
    return o


def make_band(rng, orient: str | None = None, w=(0.1, 0.16), wiggle: float = 0.0, c=(0.3, 0.7)) -> dict:
    return {
        "orient": orient or pick(rng, ("vertical", "horizontal")),
        "c": float(rng.uniform(*c)),
        "w": float(rng.uniform(*w)),
        "amp": float(rng.uniform(0.3, 1.0) * wiggle),
        "freq": float(rng.uniform(0.5, 1.2)) if wiggle else 0.0,
        "phase": float(rng.uniform(0, 2 * math.pi)),
    }


def scatter_trees(scene, placer, rng, n, ok=None, box=(0.0, 0.0, 1.0, 1.0), size=(0.035, 0.06), color="green"):
    for _ in range(n):
        s = float(rng.uniform(*size))
        add_obj(scene, placer, rng, "tree", color, s, s, box=box, ok=ok, pad=-0.004, rgb=pick(rng, TREE_GREEN) if color == "green" else None)


def cars_on_road(scene: Scene, placer: Placer, rng, road: dict, n: int) -> None:
    """Try to place ``n`` cars of :data:`CAR_COLORS` on a road band, driving along it."""
    ang = 0.0 if road["orient"] == "horizontal" else math.pi / 2
    ok = on_band(road, 0.012)
    for _ in range(n):
        add_obj(scene, placer, rng, "car", pick(rng, CAR_COLORS), 0.05, 0.025, angle=ang, ok=ok, pad=0.004)


def shore(rng) -> dict:
    return {"side": pick(rng, ("left", "right", "top", "bottom")), "extent": float(rng.uniform(0.3, 0.42)),
            "amp": float(rng.uniform(0.01, 0.04)), "freq": float(rng.uniform(0.8, 2.0)), "phase": float(rng.uniform(0, 6.28))}


def shore_box(side: str, lo: float, hi: float) -> tuple[float, float, float, float]:
    """Box at distance [lo, hi] from the ``side`` edge."""
    return {"left": (lo, 0.0, hi, 1.0), "right": (1 - hi, 0.0, 1 - lo, 1.0),
            "top": (0.0, lo, 1.0, hi), "bottom": (0.0, 1 - hi, 1.0, 1 - lo)}[side]
