"""Scene builders, one per class: each draws a :class:`Scene` and the detailed captions true of it.

A builder (registered with ``@builder(cls)`` in :data:`BUILDERS`) takes the image's generator and
returns ``(scene, detailed captions)``; :func:`make_scene` adds the class's generic captions
(:data:`~rsitr.data.synth.language.GENERIC_CAPTIONS`) and picks the five captions an image gets.
The order of the draws is part of the output: changing it changes every tile and caption of that
class.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from rsitr.data.synth.language import (
    EDGE_PHRASE, Caption, band_word, choose_captions, color_counts, colour_breakdown, count_phrase, count_sentence,
    generic_captions, number_word, region_phrase, region_sentence, side_phrase, verb_be,
)
from rsitr.data.synth.palette import (
    CANOPY, CAR_COLORS, COLORS, CONCRETE, FIELD_RGB, GROUND, GROUND_TONES, ROOF_COLORS, SHIP_COLORS, TREE_GREEN,
    darken, jitter,
)
from rsitr.data.synth.placement import (
    Placer, add_obj, cars_on_road, cell_box, make_band, scatter_trees, shore, shore_box,
)
from rsitr.data.synth.scene import (
    CLASSES, Obj, Scene, away_from_band, band_center, band_sides, common_region, on_band, on_water_side, pick, region_of,
    side_of_band,
)

# class -> builder(rng) -> (scene, detailed captions); every class of CLASSES has one
BUILDERS: dict[str, Callable[[np.random.Generator], tuple[Scene, list[Caption | None]]]] = {}


def builder(cls: str) -> Callable:
    """Register the scene builder of a class."""
    def register(fn: Callable) -> Callable:
        BUILDERS[cls] = fn
        return fn

    return register



def ground_scene(cls: str, rng: np.random.Generator) -> Scene:
    """An empty scene of ``cls`` on one of its :data:`~rsitr.data.synth.palette.GROUND` tones."""
    return Scene(cls, jitter(pick(rng, GROUND[cls]), rng))


@builder("airport")
def _build_airport(rng) -> tuple[Scene, list[Caption]]:
    s = ground_scene("airport", rng)
    rw = make_band(rng, w=(0.13, 0.17), c=(0.28, 0.4))
    if rng.random() < 0.5:
        rw["c"] = 1 - rw["c"]
    s.landmarks["runway"] = rw
    p = Placer(rng)
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
    term_col = pick(rng, ("white", "grey"))
    tw, th = (0.1, 0.3) if rw["orient"] == "vertical" else (0.3, 0.1)
    add_obj(s, p, rng, "building", term_col, tw, th, box=apron, pad=0.02, big=True)
    n = int(rng.integers(1, 6))
    for _ in range(n):
        ang = (math.pi / 2) * int(rng.integers(4))
        span = float(rng.uniform(0.12, 0.16))
        add_obj(s, p, rng, "airplane", "white" if rng.random() < 0.75 else "grey", span, span, angle=ang, box=apron, pad=0.005)
    scatter_trees(s, p, rng, int(rng.integers(0, 6)), ok=away_from_band(rw, 0.04))
    caps: list[Caption] = []
    name = pick(rng, ("runway", "airstrip"))
    caps.append(Caption(f"a long {name} runs {band_word(rw, rng)} across the airport .", [("landmark", "runway", "orient", rw["orient"])]))
    planes = s.of("airplane")
    if planes:
        ph, cl = count_phrase("airplane", len(planes), rng)
        caps.append(Caption(f"{ph} {verb_be(len(planes))} parked {side_phrase(side, 'runway')} .", cl + [("side", "airplane", None, "runway", side)]))
        caps.append(colour_breakdown(s, "airplane", rng, "parked on the apron"))
    t = region_sentence(s, "building", rng, term_col, lead="")
    if t:
        caps.append(Caption(t.text.replace(" building ", " terminal building ", 1), t.claims))
    caps.append(count_sentence(s, "tree", rng, "growing on the grass near the runway"))
    return s, caps


@builder("bareland")
def _build_bareland(rng):
    tone = pick(rng, tuple(GROUND_TONES))
    s = Scene("bareland", jitter(GROUND_TONES[tone], rng, 10))
    s.landmarks["ground"] = {"tone": tone}
    p = Placer(rng)
    caps: list[Caption] = [Caption(f"the bare ground is {tone} .", [("landmark", "ground", "tone", tone)])]
    if rng.random() < 0.5:
        tr = make_band(rng, w=(0.04, 0.06), wiggle=0.06)
        s.landmarks["track"] = tr
        caps.append(Caption(f"a dirt road crosses the bare land {band_word(tr, rng)} .", [("landmark", "track", "orient", tr["orient"])]))
        ok = away_from_band(tr, 0.02)
    else:
        ok = None
    n_trees = int(rng.integers(0, 6))
    if n_trees and rng.random() < 0.5:
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        scatter_trees(s, p, rng, n_trees, ok=ok, box=cell_box(cell), size=(0.03, 0.05))
    else:
        scatter_trees(s, p, rng, n_trees, ok=ok, size=(0.03, 0.05))
    if rng.random() < 0.35:
        col = pick(rng, ROOF_COLORS)
        sz = float(rng.uniform(0.07, 0.11))
        add_obj(s, p, rng, "building", col, sz, sz * float(rng.uniform(0.7, 1.3)), ok=ok, pad=0.02)
    caps.append(count_sentence(s, "tree", rng, ("on the bare land", "growing on the bare ground")))
    caps.append(region_sentence(s, "tree", rng, None))
    for b in s.of("building"):
        cell = common_region([b])
        where = f" {region_phrase(cell, rng)}" if cell else " on the bare land"
        caps.append(Caption(f"a small building with a {b.color} roof stands{where} .",
                            [("count", "building", b.color, 1)] + ([("region", "building", b.color, cell)] if cell else [])))
    if not s.objects:
        caps.append(Caption("there is nothing on the bare land .", [("count", "tree", None, 0), ("count", "building", None, 0)]))
    return s, caps


@builder("beach")
def _build_beach(rng):
    s = ground_scene("beach", rng)
    sh = shore(rng)
    sh["sand"] = float(rng.uniform(0.18, 0.26))
    s.landmarks["sea"] = sh
    p = Placer(rng)
    sea_name = pick(rng, ("sea", "ocean"))
    caps = [Caption(f"the {sea_name} is {EDGE_PHRASE[sh['side']]} of the image .", [("landmark", "sea", "side", sh["side"])])]
    sand_box = shore_box(sh["side"], sh["extent"] + 0.05, sh["extent"] + sh["sand"] - 0.02)
    n_u = int(rng.integers(0, 7))
    ucols = ("red", "yellow", "blue", "white")
    for _ in range(n_u):
        d = float(rng.uniform(0.03, 0.045))
        add_obj(s, p, rng, "umbrella", pick(rng, ucols), d, d, box=sand_box, ok=lambda x, y, r: not on_water_side(sh, x, y, -0.02), pad=0.005)
    n_b = int(rng.integers(0, 4))
    water_box = shore_box(sh["side"], 0.02, sh["extent"] - 0.06)
    bcol = pick(rng, ("white", "white", "red", "blue"))
    for _ in range(n_b):
        ang = (0.0 if sh["side"] in ("left", "right") else math.pi / 2) + float(rng.normal(0, 0.2)) + math.pi * int(rng.integers(2))
        add_obj(s, p, rng, "ship", bcol, float(rng.uniform(0.07, 0.1)), 0.03, angle=ang, box=water_box, ok=lambda x, y, r: on_water_side(sh, x, y, 0.05))
    land_box = shore_box(sh["side"], sh["extent"] + sh["sand"] + 0.03, 1.0)
    scatter_trees(s, p, rng, int(rng.integers(3, 12)), box=land_box)
    caps.append(count_sentence(s, "umbrella", rng, "on the sand", none="the sandy beach is empty ."))
    caps.append(colour_breakdown(s, "umbrella", rng, "standing on the beach"))
    caps.append(count_sentence(s, "ship", rng, f"sailing on the {sea_name} near the beach", color=bcol))
    caps.append(Caption(f"green trees grow behind the {pick(rng, ('yellow beach', 'sand'))} .", []))
    return s, caps


@builder("farmland")
def _build_farmland(rng):
    s = ground_scene("farmland", rng)
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    gap = float(rng.uniform(0.015, 0.03))
    p = Placer(rng)
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
                col = pick(rng, ("red", "grey", "brown"))
                nb = int(rng.integers(1, 3))
                for _ in range(nb):
                    sz = float(rng.uniform(0.06, 0.09))
                    add_obj(s, p, rng, "building", col, sz, sz * 1.4, box=(x0, y0, x1, y1), pad=0.01)
                continue
            col = pick(rng, tuple(FIELD_RGB))
            o = Obj("field", col, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, 0.0,
                    jitter(FIELD_RGB[col], rng, 14))
            o.angle = float(pick(rng, (0.0, math.pi / 2)))  # stripe direction
            s.objects.append(o)
            p.block(o.x, o.y, 0.0)
    caps: list[Caption] = []
    nf = s.count("field")
    ph, cl = count_phrase("field", nf, rng)
    caps.append(Caption(f"the farmland is divided into {ph} .", cl))
    caps.append(colour_breakdown(s, "field", rng, "arranged side by side"))
    for col in ("yellow", "green", "brown"):
        r = region_sentence(s, "field", rng, col)
        if r and s.count("field", col) == 1:
            caps.append(r)
            break
    bs = s.of("building")
    if bs:
        ph, cl = count_phrase("building", len(bs), rng, bs[0].color)
        cell = common_region(bs)
        if cell:
            caps.append(Caption(f"{ph} of a farm {verb_be(len(bs))} {region_phrase(cell, rng)} between the fields .", cl + [("region", "building", bs[0].color, cell)]))
        else:
            caps.append(Caption(f"{ph} of a farm {verb_be(len(bs))} between the fields .", cl))
    return s, caps


@builder("forest")
def _build_forest(rng):
    shade = pick(rng, tuple(CANOPY))
    s = Scene("forest", jitter(darken(CANOPY[shade][0], 0.85), rng, 6))
    s.landmarks["canopy"] = {"shade": shade}
    p = Placer(rng)
    caps: list[Caption] = [Caption(f"the forest canopy is {shade} green .", [("landmark", "canopy", "shade", shade)])]
    ok = None
    if rng.random() < 0.5:
        rd = make_band(rng, w=(0.05, 0.07), wiggle=0.05)
        s.landmarks["track"] = rd
        ok = away_from_band(rd, 0.0)
        caps.append(Caption(f"a narrow road passes through the forest {band_word(rd, rng)} .", [("landmark", "track", "orient", rd["orient"])]))
    if rng.random() < 0.4:
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        bx = cell_box(cell, 0.05)
        pond = {"x": (bx[0] + bx[2]) / 2, "y": (bx[1] + bx[3]) / 2, "rx": float(rng.uniform(0.08, 0.12)), "ry": float(rng.uniform(0.07, 0.11)), "cell": cell}
        if ok is None or away_from_band(s.landmarks["track"], 0.02)(pond["x"], pond["y"], max(pond["rx"], pond["ry"])):
            s.landmarks["pond"] = pond
            p.block(pond["x"], pond["y"], max(pond["rx"], pond["ry"]) + 0.02)
            caps.append(Caption(f"a small pond lies {region_phrase(cell, rng)} of the forest .", [("landmark", "pond", "cell", cell)]))
    if rng.random() < 0.4:  # a clearing with a house
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        bx = cell_box(cell, 0.07)
        cl = {"x": (bx[0] + bx[2]) / 2, "y": (bx[1] + bx[3]) / 2, "r": float(rng.uniform(0.08, 0.1)), "cell": cell}
        free = p.free(cl["x"], cl["y"], cl["r"], 0.03) and (ok is None or away_from_band(s.landmarks["track"], 0.02)(cl["x"], cl["y"], cl["r"]))
        if free:
            s.landmarks["clearing"] = cl
            col = pick(rng, ROOF_COLORS)
            sz = float(rng.uniform(0.06, 0.08))
            s.objects.append(Obj("house", col, cl["x"], cl["y"], sz, sz * 0.8, 0.0, jitter(COLORS[col], rng, 10)))
            p.block(cl["x"], cl["y"], cl["r"])
            caps.append(Caption(f"a house with a {col} roof stands in a clearing {region_phrase(cell, rng)} .",
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
            yellow.append(Obj("tree", "yellow", pos[0], pos[1], sz, sz, 0.0, jitter((196, 170, 54), rng, 10)))
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
            s.objects.append(Obj("tree", "green", float(x), float(y), sz, sz, 0.0, jitter(CANOPY[shade][int(greens[a, b]) % 3], rng, 6)))
    s.objects.extend(yellow)
    if n_y and s.count("tree", "yellow"):
        ny = s.count("tree", "yellow")
        ph, cl = count_phrase("tree", ny, rng, "yellow")
        caps.append(Caption(f"{ph} {verb_be(ny)} scattered among the green ones .", cl))
        caps.append(region_sentence(s, "tree", rng, "yellow"))
    else:
        caps.append(Caption("all the trees in the forest are green .", [("count", "tree", "yellow", 0)]))
    return s, caps


@builder("industrial")
def _build_industrial(rng):
    s = ground_scene("industrial", rng)
    rd = make_band(rng, w=(0.08, 0.11), c=(0.35, 0.65))
    s.landmarks["road"] = rd
    p = Placer(rng)
    away = away_from_band(rd, 0.02)
    nb = int(rng.integers(2, 7))
    roof = ("white", "grey", "blue")
    for _ in range(nb):
        w, h = float(rng.uniform(0.14, 0.24)), float(rng.uniform(0.1, 0.18))
        add_obj(s, p, rng, "building", pick(rng, roof), w, h, ok=away, pad=0.015)
    nt = int(rng.integers(0, 4))
    for _ in range(nt):
        d = float(rng.uniform(0.07, 0.1))
        add_obj(s, p, rng, "tank", "white", d, d, ok=away, pad=0.01)
    cars_on_road(s, p, rng, rd, int(rng.integers(0, 7)))
    caps = [Caption(f"a road runs {band_word(rd, rng)} through the industrial area .", [("landmark", "road", "orient", rd["orient"])])]
    ph, cl = count_phrase("building", s.count("building"), rng)
    sides = {side_of_band(rd, b) for b in s.of("building")}
    caps.append(Caption(f"{ph} {verb_be(s.count('building'))} on both sides of the road ." if len(sides) > 1
                        else f"{ph} {verb_be(s.count('building'))} on one side of the road .", cl))
    roofs = color_counts(s.of("building"))
    parts = [f"{number_word(n)} {col} roof{'s' if n > 1 else ''}" for col, n in roofs.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caps.append(Caption(f"the factories have {text} .", [("count", "building", col, n) for col, n in roofs.items()]))
    caps.append(count_sentence(s, "tank", rng, "next to the factories"))
    caps.append(count_sentence(s, "car", rng, "driving on the road", none="there are no vehicles on the road ."))
    return s, caps


@builder("junction")
def _build_junction(rng):
    s = ground_scene("junction", rng)
    h = make_band(rng, "horizontal", w=(0.12, 0.16), c=(0.35, 0.65))
    v = make_band(rng, "vertical", w=(0.12, 0.16), c=(0.35, 0.65))
    tee = rng.random() < 0.4
    v["tee"] = tee
    if tee:  # the vertical road stops at the horizontal one, coming from the top or the bottom
        v["stop"] = pick(rng, ("top", "bottom"))
    s.landmarks["road_h"] = h
    s.landmarks["road_v"] = v
    p = Placer(rng)
    nc = int(rng.integers(0, 11))
    for _ in range(nc):
        col = pick(rng, CAR_COLORS)
        if rng.random() < 0.55:
            add_obj(s, p, rng, "car", col, 0.05, 0.026, angle=0.0, ok=on_band(h, 0.015), pad=0.005)
        else:
            def ok(x, y, r=0.0, v=v):
                if not on_band(v, 0.015)(x, y):
                    return False
                if "stop" in v:
                    return y < h["c"] if v["stop"] == "top" else y > h["c"]
                return True
            add_obj(s, p, rng, "car", col, 0.05, 0.026, angle=math.pi / 2, ok=ok, pad=0.005)

    def off_road(x, y, r=0.0):
        return away_from_band(h, 0.01)(x, y, r) and away_from_band(v, 0.01)(x, y, r)

    nb = int(rng.integers(0, 5))
    roof = pick(rng, ROOF_COLORS)
    for _ in range(nb):
        sz = float(rng.uniform(0.08, 0.12))
        add_obj(s, p, rng, "building", roof, sz, sz * float(rng.uniform(0.8, 1.4)), ok=off_road, pad=0.02)
    scatter_trees(s, p, rng, int(rng.integers(2, 10)), ok=off_road)
    caps = [Caption("two roads meet at a t-shaped junction ." if tee else "two roads cross each other at a crossroads .", [("landmark", "road_v", "tee", tee)])]
    if tee:
        caps.append(Caption(f"a road from the {v['stop']} joins a horizontal road .", [("landmark", "road_v", "stop", v["stop"])]))
    caps.append(count_sentence(s, "car", rng, ("on the roads", "driving through the junction"), none="there are no cars on the roads ."))
    caps.append(colour_breakdown(s, "car", rng, "on the road"))
    if s.count("building"):
        nb_ = s.count("building")
        ph, cl = count_phrase("building", nb_, rng, roof)
        caps.append(Caption(f"{ph} {verb_be(nb_)} near the corners of the intersection .", cl))
    return s, caps


@builder("lake")
def _build_lake(rng):
    s = ground_scene("lake", rng)
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    cx = (cell[0] + 0.5) / 3 + float(rng.uniform(-0.04, 0.04))
    cy = (cell[1] + 0.5) / 3 + float(rng.uniform(-0.04, 0.04))
    rx, ry = float(rng.uniform(0.17, 0.28)), float(rng.uniform(0.15, 0.26))
    lake = {"x": cx, "y": cy, "rx": rx, "ry": ry, "cell": cell, "wob": [float(v) for v in rng.uniform(-0.12, 0.12, size=8)]}
    s.landmarks["lake"] = lake
    p = Placer(rng)

    def in_lake(x, y, m=0.0):
        return ((x - cx) / (rx - m)) ** 2 + ((y - cy) / (ry - m)) ** 2 < 1

    nb = int(rng.integers(0, 4))
    bcol = pick(rng, ("white", "white", "red", "yellow"))
    for _ in range(nb):
        add_obj(s, p, rng, "ship", bcol, float(rng.uniform(0.05, 0.07)), 0.025, angle=float(rng.uniform(0, math.pi)),
                ok=lambda x, y, r: in_lake(x, y, 0.06), pad=0.01)
    nh = int(rng.integers(0, 4))
    hcol = pick(rng, ROOF_COLORS)
    for _ in range(nh):
        sz = float(rng.uniform(0.06, 0.09))
        add_obj(s, p, rng, "house", hcol, sz, sz, ok=lambda x, y, r: not in_lake(x, y, -0.15), pad=0.02)
    scatter_trees(s, p, rng, int(rng.integers(8, 30)), ok=lambda x, y, r: not in_lake(x, y, -0.12))
    name = pick(rng, ("lake", "pond"))
    caps = [Caption(f"a {pick(rng, ('blue', 'large', 'calm'))} {name} {region_phrase(cell, rng)} is surrounded by green land .", [("landmark", "lake", "cell", cell)])]
    caps.append(count_sentence(s, "ship", rng, f"on the {name}", color=bcol, none=f"there are no boats on the {name} ."))
    nh = s.count("house")
    if nh:
        ph, cl = count_phrase("house", nh, rng)
        roofs = f"{hcol} roofs" if nh > 1 else f"a {hcol} roof"
        caps.append(Caption(f"{ph} with {roofs} {verb_be(nh)} near the {name} .", cl + [("count", "house", hcol, nh)]))
    caps.append(Caption(f"some trees grow around the {name} .", []))
    return s, caps


@builder("parking")
def _build_parking(rng):
    s = ground_scene("parking", rng)
    x0, y0 = float(rng.uniform(0.04, 0.12)), float(rng.uniform(0.04, 0.12))
    x1, y1 = float(rng.uniform(0.88, 0.96)), float(rng.uniform(0.88, 0.96))
    rows = int(rng.integers(2, 5))
    orient = pick(rng, ("horizontal", "vertical"))
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
        col = pick(rng, CAR_COLORS)
        s.objects.append(Obj("car", col, x, y, 0.055, 0.028, ang, jitter(COLORS[col], rng, 10)))
    p = Placer(rng)
    p.block(0.5, 0.5, 0.0)
    scatter_trees(s, p, rng, int(rng.integers(0, 8)), ok=lambda x, y, r: not (x0 - 0.03 < x < x1 + 0.03 and y0 - 0.03 < y < y1 + 0.03), size=(0.03, 0.045))
    caps: list[Caption] = []
    cars = s.of("car")
    ph, cl = count_phrase("car", len(cars), rng)
    caps.append(Caption(f"{ph} {verb_be(len(cars))} parked in the parking lot .", cl))
    full = len(cars) / len(slots)
    if full < 0.3:
        caps.append(Caption("the parking lot is mostly empty .", []))
    elif full > 0.7:
        caps.append(Caption("the parking lot is almost full .", []))
    caps.append(colour_breakdown(s, "car", rng, "parked here"))
    for col in CAR_COLORS:
        objs = s.of("car", col)
        if len(objs) == 1:
            r = region_sentence(s, "car", rng, col)
            if r:
                caps.append(r)
                break
    caps.append(Caption(f"the parking spaces are arranged in {number_word(rows)} rows .", [("landmark", "lot", "rows", rows)]))
    return s, caps


@builder("port")
def _build_port(rng):
    s = Scene("port", jitter(CONCRETE, rng, 14))
    sh = shore(rng)
    sh["extent"] = float(rng.uniform(0.38, 0.5))
    sh["amp"] = 0.0
    s.landmarks["water"] = sh
    p = Placer(rng)
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
        add_obj(s, p, rng, "ship", pick(rng, SHIP_COLORS), L, L * 0.28, angle=ang,
                ok=lambda x, y, r: on_water_side(sh, x, y, 0.06), pad=0.01)
    land = shore_box(sh["side"], sh["extent"] + 0.04, 1.0)
    nc = int(rng.integers(0, 9))
    ccol = ("red", "blue", "orange", "green")
    for _ in range(nc):
        add_obj(s, p, rng, "container", pick(rng, ccol), 0.07, 0.03, angle=0.0 if horiz else math.pi / 2, box=land, pad=0.008)
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 4))):
            d = float(rng.uniform(0.07, 0.1))
            add_obj(s, p, rng, "tank", "white", d, d, box=land, pad=0.01)
    caps = [Caption(f"the water of the harbour is {EDGE_PHRASE[sh['side']]} .", [("landmark", "water", "side", sh["side"])])]
    caps.append(count_sentence(s, "ship", rng, pick(rng, ("docked in the port", "moored near the piers", "in the harbour"))))
    caps.append(colour_breakdown(s, "ship", rng, "in the port"))
    caps.append(count_sentence(s, "container", rng, "stacked on the quay"))
    caps.append(count_sentence(s, "tank", rng, "on the land next to the port"))
    caps.append(Caption(f"{number_word(npier) if npier > 1 else 'a'} {'piers extend' if npier > 1 else 'pier extends'} into the water .", [("landmark", "water", "n_piers", npier)]))
    return s, caps


@builder("residential")
def _build_residential(rng):
    s = ground_scene("residential", rng)
    rd = make_band(rng, w=(0.09, 0.12), c=(0.38, 0.62))
    s.landmarks["road"] = rd
    p = Placer(rng)
    n_target = int(rng.integers(3, 13))
    main = pick(rng, ROOF_COLORS)
    off = away_from_band(rd, 0.015)
    for _ in range(n_target):
        col = main if rng.random() < 0.55 else pick(rng, ROOF_COLORS)
        sz = float(rng.uniform(0.08, 0.12))
        ang = 0.0 if rd["orient"] == "vertical" else math.pi / 2
        add_obj(s, p, rng, "house", col, sz, sz * float(rng.uniform(0.7, 1.0)), angle=ang, ok=off, pad=0.025)
    cars_on_road(s, p, rng, rd, int(rng.integers(0, 6)))
    scatter_trees(s, p, rng, int(rng.integers(4, 16)), ok=off, size=(0.03, 0.055))
    caps = [Caption(f"a road runs {band_word(rd, rng)} through the residential area .", [("landmark", "road", "orient", rd["orient"])])]
    nh = s.count("house")
    ph, cl = count_phrase("house", nh, rng)
    caps.append(Caption(f"{ph} {verb_be(nh)} built along the road .", cl))
    counts = color_counts(s.of("house"))
    col, k = next(iter(counts.items()))
    caps.append(Caption(f"{number_word(k)} of the houses have {col} roofs ." if k > 1 else f"only one of the houses has a {col} roof .", [("count", "house", col, k)]))
    for col in counts:
        sides = {side_of_band(rd, o) for o in s.of("house", col)}
        if len(sides) == 1 and None not in sides:
            ph, cl = count_phrase("house", counts[col], rng)
            roofs = f"{col} roofs" if counts[col] > 1 else f"a {col} roof"
            sd = sides.pop()
            caps.append(Caption(f"{ph} with {roofs} {verb_be(counts[col])} {side_phrase(sd, 'road')} .",
                                [("count", "house", col, counts[col]), ("side", "house", col, "road", sd)]))
            break
    caps.append(count_sentence(s, "car", rng, "on the road"))
    return s, caps


@builder("river")
def _build_river(rng):
    s = ground_scene("river", rng)
    rv = make_band(rng, w=(0.13, 0.2), wiggle=0.06, c=(0.38, 0.62))
    s.landmarks["river"] = rv
    p = Placer(rng)
    caps = [Caption(f"a {pick(rng, ('winding', 'wide', 'blue'))} river flows {band_word(rv, rng)} .", [("landmark", "river", "orient", rv["orient"])])]
    if rng.random() < 0.4:
        t = float(rng.uniform(0.25, 0.75))
        rv["has_bridge"] = True
        caps.append(Caption("a bridge crosses the river .", [("landmark", "river", "has_bridge", True)]))
        br = {"orient": "horizontal" if rv["orient"] == "vertical" else "vertical", "c": t, "w": 0.05}
        s.landmarks["bridge"] = br
        p.block(*((band_center(rv, t), t) if rv["orient"] == "vertical" else (t, band_center(rv, t))), 0.08)
    side = pick(rng, band_sides(rv))
    col = pick(rng, ROOF_COLORS)

    def on_side(x, y, r=0.0):
        return side_of_band(rv, Obj("building", col, x, y, 2 * r, 0.0)) == side

    nb = int(rng.integers(0, 6))
    for _ in range(nb):
        sz = float(rng.uniform(0.07, 0.1))
        add_obj(s, p, rng, "building", col, sz, sz, ok=on_side, pad=0.02)
    nboat = int(rng.integers(0, 3))
    ang = math.pi / 2 if rv["orient"] == "vertical" else 0.0
    for _ in range(nboat):
        add_obj(s, p, rng, "ship", "white", 0.06, 0.022, angle=ang, ok=on_band(rv, 0.035), pad=0.02)
    scatter_trees(s, p, rng, int(rng.integers(5, 18)), ok=away_from_band(rv, 0.01))
    if s.count("building"):
        n = s.count("building")
        ph, cl = count_phrase("building", n, rng, col)
        caps.append(Caption(f"{ph} {verb_be(n)} {side_phrase(side, 'river')} .", cl + [("side", "building", col, "river", side)]))
    else:
        caps.append(Caption("there are no buildings near the river .", [("count", "building", None, 0)]))
    caps.append(count_sentence(s, "ship", rng, "on the river", color="white"))
    caps.append(Caption("green trees grow on both banks of the river ." if len({side_of_band(rv, t) for t in s.of("tree")} - {None}) == 2
                        else "some trees grow along the river .", []))
    return s, caps


@builder("stadium")
def _build_stadium(rng):
    s = ground_scene("stadium", rng)
    cell = pick(rng, ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2)))
    cx = 0.5 + (cell[0] - 1) * 0.2
    cy = 0.5 + (cell[1] - 1) * 0.2
    horiz = rng.random() < 0.5
    rx, ry = (0.3, 0.2) if horiz else (0.2, 0.3)
    track_col = pick(rng, ("red", "red", "blue", "brown"))
    st = {"x": cx, "y": cy, "rx": rx, "ry": ry, "track": track_col, "cell": region_of(cx, cy)}
    s.landmarks["stadium"] = st
    p = Placer(rng)
    p.block(cx, cy, max(rx, ry) + 0.06)
    nc = int(rng.integers(0, 9))
    for _ in range(nc):
        add_obj(s, p, rng, "car", pick(rng, CAR_COLORS), 0.05, 0.025, angle=pick(rng, (0.0, math.pi / 2)), pad=0.01)
    scatter_trees(s, p, rng, int(rng.integers(0, 8)), size=(0.03, 0.045))
    track_word = track_col
    caps = [Caption(f"a stadium with a {track_word} running track around a green football field .", [("landmark", "stadium", "track", track_col)])]
    caps.append(Caption(f"the stadium is {region_phrase(st['cell'], rng)} of the image .", [("landmark", "stadium", "cell", st["cell"])]))
    caps.append(count_sentence(s, "car", rng, "parked outside the stadium", none="no cars are parked around the stadium ."))
    caps.append(Caption(f"the oval stadium is {'wider than it is tall' if horiz else 'taller than it is wide'} .", []))
    return s, caps


@builder("storagetanks")
def _build_storagetanks(rng):
    s = ground_scene("storagetanks", rng)
    p = Placer(rng)
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
            s.objects.append(Obj("tank", col, x, y, d, d, 0.0, jitter(COLORS[col], rng, 8)))
            p.block(x, y, d / 2)
    if not s.objects:
        s.objects.append(Obj("tank", "white", 0.5, 0.5, d, d, 0.0, jitter(COLORS["white"], rng, 8)))
        p.block(0.5, 0.5, d / 2)
    nb = int(rng.integers(0, 3))
    for _ in range(nb):
        add_obj(s, p, rng, "building", "grey", float(rng.uniform(0.1, 0.15)), float(rng.uniform(0.06, 0.09)), pad=0.02)
    scatter_trees(s, p, rng, int(rng.integers(0, 6)), size=(0.03, 0.045))
    caps = []
    caps.append(count_sentence(s, "tank", rng, pick(rng, ("in the tank farm", "close to each other", "arranged neatly"))))
    caps.append(colour_breakdown(s, "tank", rng, "standing on the ground"))
    used_rows = len({round(o.y, 3) for o in s.of("tank")})
    if used_rows > 1:
        caps.append(Caption(f"the tanks are arranged in {number_word(used_rows)} rows .", [("landmark", "tanks", "rows", used_rows)]))
        s.landmarks["tanks"] = {"rows": used_rows}
    else:
        caps.append(Caption("the tanks stand in a single row .", [("landmark", "tanks", "rows", 1)]))
        s.landmarks["tanks"] = {"rows": 1}
    caps.append(count_sentence(s, "building", rng, "next to the tanks", color="grey"))
    return s, caps


def make_scene(cls: str, rng: np.random.Generator) -> tuple[Scene, list[Caption]]:
    """Draw a scene of class ``cls`` and its 5 captions (1-2 generic, the rest detailed)."""
    scene, details = BUILDERS[cls](rng)
    return scene, choose_captions(details, generic_captions(scene), rng)


assert set(BUILDERS) == set(CLASSES), sorted(set(BUILDERS) ^ set(CLASSES))
