"""Colours of the synthetic benchmark: the colour words captions use (with their RGB) and the
ground, water and vegetation tones tiles are drawn with."""
from __future__ import annotations

import numpy as np

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


GROUND_TONES = {"brown": (150, 118, 86), "yellow": (200, 176, 122), "reddish": (172, 114, 84), "grey": (152, 148, 138)}
CANOPY = {"dark": ((34, 70, 30), (30, 62, 28), (40, 76, 34)), "light": ((72, 120, 52), (80, 128, 58), (66, 112, 48))}


def jitter(rgb, rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(e)))) for c, e in zip(rgb, d))  # type: ignore[return-value]


def darken(rgb, f=0.6):
    return tuple(int(c * f) for c in rgb)


def lighten(rgb, f=0.25):
    return tuple(int(c + (255 - c) * f) for c in rgb)


# class -> the ground tones a tile of the class is drawn on (one is picked, then jittered); bareland,
# forest and port choose their ground themselves
GROUND: dict[str, tuple[tuple[int, int, int], ...]] = {
    "airport": GRASS, "beach": GRASS, "farmland": SOIL, "industrial": (CONCRETE, (160, 156, 146), (150, 146, 140)),
    "junction": GRASS, "lake": GRASS, "parking": GRASS, "residential": GRASS, "river": GRASS,
    "stadium": GRASS + (CONCRETE,), "storagetanks": SOIL + (CONCRETE,),
}
