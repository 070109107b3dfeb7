"""Drawing a :class:`Scene` as an RGB tile with PIL ``ImageDraw`` (shadows, roof ridges, lane
markings, stripes, ripples), then texturing it (low-frequency illumination, grain and pixel noise)
so that classes are not separable by mean colour."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from rsitr.data.synth.palette import ASPHALT, COLORS, CONCRETE, GRASS, SAND, SOIL, WATER, darken, jitter, lighten
from rsitr.data.synth.scene import Obj, Scene, band_center, on_band, on_water_side, pick

def _rot_poly(cx, cy, pts, ang, S):
    c, s = math.cos(ang), math.sin(ang)
    return [((cx + px * c - py * s) * S, (cy + px * s + py * c) * S) for px, py in pts]


def _rect_pts(w, h, dx=0.0, dy=0.0):
    return [(dx - w / 2, dy - h / 2), (dx + w / 2, dy - h / 2), (dx + w / 2, dy + h / 2), (dx - w / 2, dy + h / 2)]


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
            d.line(_band_line(lm, S, off, n=24, t0=t0, t1=t1), fill=lighten(color, 0.35), width=lw)


def _water_texture(d, box_pts_fn, rng, S, base, n=14):
    for _ in range(n):
        x, y = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
        if box_pts_fn(x, y):
            L = float(rng.uniform(0.03, 0.08))
            d.line([(x * S, y * S), ((x + L) * S, (y + 0.004) * S)], fill=lighten(base, 0.12), width=1)


def _draw_obj(d: ImageDraw.ImageDraw, o: Obj, S: int, bg) -> None:
    sh = 0.012 if o.kind in ("building", "house", "tank", "airplane", "container") else 0.006
    k = o.kind
    if k == "tree":
        r = o.w / 2
        d.ellipse([((o.x - r + 0.008) * S), ((o.y - r + 0.008) * S), ((o.x + r + 0.008) * S), ((o.y + r + 0.008) * S)], fill=darken(bg, 0.45))
        d.ellipse([((o.x - r) * S), ((o.y - r) * S), ((o.x + r) * S), ((o.y + r) * S)], fill=o.rgb)
        r2 = r * 0.45
        d.ellipse([((o.x - r2 - r * 0.2) * S), ((o.y - r2 - r * 0.2) * S), ((o.x + r2 - r * 0.2) * S), ((o.y + r2 - r * 0.2) * S)], fill=lighten(o.rgb, 0.12))
    elif k in ("tank", "umbrella"):
        r = o.w / 2
        if k == "tank":
            d.ellipse([((o.x - r + sh) * S), ((o.y - r + sh) * S), ((o.x + r + sh) * S), ((o.y + r + sh) * S)], fill=darken(bg, 0.5))
        d.ellipse([((o.x - r) * S), ((o.y - r) * S), ((o.x + r) * S), ((o.y + r) * S)], fill=o.rgb)
        if k == "tank":
            r2 = r * 0.7
            d.ellipse([((o.x - r2) * S), ((o.y - r2) * S), ((o.x + r2) * S), ((o.y + r2) * S)], outline=darken(o.rgb, 0.8), width=max(1, S // 128))
        else:
            d.line([((o.x - r) * S, o.y * S), ((o.x + r) * S, o.y * S)], fill=darken(o.rgb, 0.8), width=1)
    elif k in ("building", "house", "container", "car"):
        pts = _rect_pts(o.w, o.h)
        if k != "car":
            d.polygon(_rot_poly(o.x + sh, o.y + sh, pts, o.angle, S), fill=darken(bg, 0.5))
        d.polygon(_rot_poly(o.x, o.y, pts, o.angle, S), fill=o.rgb)
        if k == "house":  # roof ridge: the two slopes differ in brightness
            half = [(-o.w / 2, 0.0), (o.w / 2, 0.0), (o.w / 2, o.h / 2), (-o.w / 2, o.h / 2)]
            d.polygon(_rot_poly(o.x, o.y, half, o.angle, S), fill=darken(o.rgb, 0.8))
        elif k == "building":
            d.polygon(_rot_poly(o.x, o.y, _rect_pts(o.w * 0.8, o.h * 0.7), o.angle, S), outline=darken(o.rgb, 0.85))
        elif k == "car":  # windscreen
            d.polygon(_rot_poly(o.x, o.y, _rect_pts(o.w * 0.25, o.h * 0.8, dx=o.w * 0.12), o.angle, S), fill=darken(o.rgb, 0.55))
    elif k == "ship":
        L, W = o.w, o.h
        hull = [(-L / 2, -W / 2), (L / 4, -W / 2), (L / 2, 0.0), (L / 4, W / 2), (-L / 2, W / 2)]
        d.polygon(_rot_poly(o.x + 0.006, o.y + 0.006, hull, o.angle, S), fill=darken(bg, 0.7))
        d.polygon(_rot_poly(o.x, o.y, hull, o.angle, S), fill=o.rgb)
        cabin = _rect_pts(L * 0.22, W * 0.6, dx=-L * 0.25)
        d.polygon(_rot_poly(o.x, o.y, cabin, o.angle, S), fill=lighten(o.rgb, 0.4) if o.color != "white" else (170, 170, 170))
    elif k == "airplane":
        L = o.w
        parts = [_rect_pts(L, L * 0.12), _rect_pts(L * 0.18, L * 0.95, dx=L * 0.05), _rect_pts(L * 0.1, L * 0.38, dx=-L * 0.42)]
        for pts in parts:
            d.polygon(_rot_poly(o.x + sh, o.y + sh, pts, o.angle, S), fill=darken(bg, 0.5))
        for pts in parts:
            d.polygon(_rot_poly(o.x, o.y, pts, o.angle, S), fill=o.rgb)
    elif k == "field":
        x0, y0, x1, y1 = (o.x - o.w / 2) * S, (o.y - o.h / 2) * S, (o.x + o.w / 2) * S, (o.y + o.h / 2) * S
        d.rectangle([x0, y0, x1, y1], fill=o.rgb)
        stripe = darken(o.rgb, 0.86)
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
        d.ellipse([(x - r) * S, (y - r * 0.7) * S, (x + r) * S, (y + r * 0.7) * S], fill=jitter(bg, rng, 10))
    if "sea" in lm or "water" in lm:
        sh = lm.get("sea") or lm["water"]
        water = jitter(pick(rng, WATER), rng, 8)
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
            d.polygon([(x * S, y * S) for x, y in edge_pts(sh["extent"] + sh["sand"]) + corner], fill=jitter(SAND, rng, 10))
        d.polygon([(x * S, y * S) for x, y in edge_pts(sh["extent"]) + corner], fill=water)
        if "sand" in sh:  # surf line
            d.line([(x * S, y * S) for x, y in edge_pts(sh["extent"] - 0.01)], fill=(225, 232, 236), width=max(1, S // 100))
        _water_texture(d, lambda x, y: on_water_side(sh, x, y, 0.02), rng, S, water, n=20)
        for pr in sh.get("piers", []):
            L, t, w = pr["len"], pr["t"], pr["w"]
            e = sh["extent"]
            box = {"left": (e - L, t - w / 2, e + 0.02, t + w / 2), "right": (1 - e - 0.02, t - w / 2, 1 - e + L, t + w / 2),
                   "top": (t - w / 2, e - L, t + w / 2, e + 0.02), "bottom": (t - w / 2, 1 - e - 0.02, t + w / 2, 1 - e + L)}[sh["side"]]
            d.rectangle([box[0] * S, box[1] * S, box[2] * S, box[3] * S], fill=jitter(CONCRETE, rng, 6))
    if "farmyard" in lm:
        b = lm["farmyard"]["box"]
        d.rectangle([b[0] * S, b[1] * S, b[2] * S, b[3] * S], fill=jitter(GRASS[0], rng, 8))
    if "apron" in lm:
        b = lm["apron"]["box"]
        d.rectangle([b[0] * S, b[1] * S, b[2] * S, b[3] * S], fill=jitter((150, 150, 150), rng, 8))
    if "runway" in lm:
        rw = lm["runway"]
        d.polygon(_band_poly(rw, S), fill=jitter((110, 110, 112), rng, 6))
        _dashes(d, _band_line(rw, S, 0.0, n=60), (240, 240, 240), max(1, S // 100))
        for off in (-rw["w"] / 2 + 0.01, rw["w"] / 2 - 0.01):
            d.line(_band_line(rw, S, off, n=4), fill=(225, 225, 225), width=max(1, S // 128))
    if "lake" in lm:
        L = lm["lake"]
        water = jitter(pick(rng, WATER), rng, 8)
        pts = []
        for k in range(48):
            a = 2 * math.pi * k / 48
            wob = 1 + sum(v * math.sin((j + 2) * a + j) for j, v in enumerate(L["wob"][:3])) / 3
            wob = min(1.0, wob)  # never outside the ellipse used for placement
            pts.append(((L["x"] + L["rx"] * wob * math.cos(a)) * S, (L["y"] + L["ry"] * wob * math.sin(a)) * S))
        d.polygon(pts, fill=darken(bg, 0.8))
        d.polygon([((x - L["x"] * S) * 0.95 + L["x"] * S, (y - L["y"] * S) * 0.95 + L["y"] * S) for x, y in pts], fill=water)
        _water_texture(d, lambda x, y: ((x - L["x"]) / L["rx"]) ** 2 + ((y - L["y"]) / L["ry"]) ** 2 < 0.6, rng, S, water, n=12)
    if "clearing" in lm:
        C = lm["clearing"]
        d.ellipse([(C["x"] - C["r"]) * S, (C["y"] - C["r"]) * S, (C["x"] + C["r"]) * S, (C["y"] + C["r"]) * S], fill=jitter((150, 140, 96), rng, 8))
    if "pond" in lm:
        P = lm["pond"]
        d.ellipse([(P["x"] - P["rx"]) * S, (P["y"] - P["ry"]) * S, (P["x"] + P["rx"]) * S, (P["y"] + P["ry"]) * S], fill=jitter(pick(rng, WATER), rng, 8))
    if "river" in lm:
        rv = lm["river"]
        d.polygon(_band_poly(rv, S, w=rv["w"] + 0.02, n=40), fill=jitter(SOIL[0], rng, 8))
        water = jitter(pick(rng, WATER), rng, 8)
        d.polygon(_band_poly(rv, S, n=40), fill=water)
        _water_texture(d, on_band(rv, 0.01), rng, S, water, n=16)
    if "bridge" in lm:
        br = lm["bridge"]
        rv = lm["river"]
        c0 = band_center(rv, br["c"])
        span = (c0 - rv["w"] / 2 - 0.06, c0 + rv["w"] / 2 + 0.06)
        _draw_road(d, br, S, color=(150, 150, 146), t0=span[0], t1=span[1], lanes=False)
    if "track" in lm:
        _draw_road(d, lm["track"], S, color=jitter((176, 150, 110), rng, 8), lanes=False)
    for key in ("road", "road_h", "road_v"):
        if key in lm:
            rd = lm[key]
            t0, t1 = -0.05, 1.05
            if rd.get("stop") == "top":
                t1 = lm["road_h"]["c"]
            elif rd.get("stop") == "bottom":
                t0 = lm["road_h"]["c"]
            _draw_road(d, rd, S, color=jitter(ASPHALT, rng, 6), t0=t0, t1=t1, lanes=key != "road_v" or "stop" not in rd)
    if "road_h" in lm:  # clear the crossing area of lane lines
        h, v = lm["road_h"], lm["road_v"]
        x0, x1 = v["c"] - v["w"] / 2, v["c"] + v["w"] / 2
        y0, y1 = h["c"] - h["w"] / 2, h["c"] + h["w"] / 2
        d.rectangle([x0 * S, y0 * S, x1 * S, y1 * S], fill=jitter(ASPHALT, rng, 4))
    if "lot" in lm:
        L = lm["lot"]
        x0, y0, x1, y1 = L["box"]
        d.rectangle([x0 * S, y0 * S, x1 * S, y1 * S], fill=jitter(ASPHALT, rng, 8))
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
        d.ellipse([(x - rx) * S, (y - ry) * S, (x + rx) * S, (y + ry) * S], fill=jitter(COLORS[st["track"]], rng, 10))
        ix, iy = rx - 0.05, ry - 0.05
        d.ellipse([(x - ix) * S, (y - iy) * S, (x + ix) * S, (y + iy) * S], fill=jitter((70, 150, 60), rng, 8))
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
