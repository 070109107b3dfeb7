"""Contact sheets: the top-k hits of a search as one PNG grid (``rsitr search ... --contact-sheet OUT``).

Each cell holds the hit's tile (rendered as it was indexed, :func:`rsitr.search.sources.read_item`,
scaled to fit a ``cell`` x ``cell`` square) and three lines of text under it: rank and score, the
file name, and the place - the footprint's centre (lat, lon) and the tile's ground size for a
georeferenced tile ("whole scene < 320 m" when the scene is smaller than one tile of that scale), else its pixel window (``x,y wxh``), or "whole image". Cells run left to right,
``cols`` per row, in rank order. PIL only: DejaVu Sans when the system has it, else PIL's own font.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from rsitr.search.sources import Item, read_item
from rsitr.utils.errors import DataError, RsitrError
from rsitr.utils.io import atomic_path

log = logging.getLogger(__name__)

PAD = 8  # pixels around and between cells
LINES = 3  # text lines under each tile
FONT_PX = 12
LINE_PX = 15
BACKGROUND = (255, 255, 255)
MISSING = (228, 231, 236)  # a tile that cannot be read any more


def sheet_size(n: int, cell: int, cols: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a sheet of ``n`` cells, ``cols`` per row."""
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    return PAD + cols * (cell + PAD), PAD + rows * (cell + LINES * LINE_PX + PAD)


def cell_origin(i: int, cell: int, cols: int) -> tuple[int, int]:
    """Top-left pixel of cell ``i``'s tile square."""
    r, c = divmod(i, cols)
    return PAD + c * (cell + PAD), PAD + r * (cell + LINES * LINE_PX + PAD)


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def scale_text(r: dict) -> str:
    """A metre hit's tile size: ``80 m``, or ``whole scene < 320 m`` for a scene smaller than one tile
    of that scale (its footprint is the scene's, not ``scale_m`` across)."""
    return f"whole scene < {r['scale_m']:g} m" if r.get("whole_scene") else f"{r['scale_m']:g} m"


def place_text(r: dict) -> str:
    """Where a hit is, in a few characters (see the module doc)."""
    wb = r.get("wgs84")
    if wb and all(math.isfinite(v) for v in wb):
        text = f"{(wb[1] + wb[3]) / 2:.5f}, {(wb[0] + wb[2]) / 2:.5f}"
        return text + (f" · {scale_text(r)}" if r.get("scale_m") else "")
    w = r.get("window")
    return f"x{w[0]} y{w[1]} {w[2]}x{w[3]}" if w else "whole image"


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_sheet(results: Sequence[dict], item_of: Callable[[int], Item], cell: int = 192, cols: int = 5) -> Image.Image:
    """The contact sheet of ``results`` (search result dicts; ``item_of(id)`` gives each one's item)."""
    if not results:
        raise RsitrError("no results: nothing to put on a contact sheet")
    cols = max(1, min(int(cols), len(results)))
    sheet = Image.new("RGB", sheet_size(len(results), cell, cols), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(FONT_PX)
    for i, r in enumerate(results):
        x, y = cell_origin(i, cell, cols)
        try:
            tile = read_item(item_of(int(r["id"])))
            tile = ImageOps.contain(tile, (cell, cell), Image.Resampling.LANCZOS)  # fitted: shrunk or enlarged
            sheet.paste(tile, (x + (cell - tile.size[0]) // 2, y + (cell - tile.size[1]) // 2))
        except DataError as exc:
            log.warning("contact sheet: %s", exc)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=MISSING)
        lines = [f"#{r['rank']}  {r['score']:.4f}", Path(r["path"]).name, place_text(r)]
        for j, text in enumerate(lines):
            draw.text((x, y + cell + 2 + j * LINE_PX), _fit(text, font, cell, draw), fill=(16, 24, 40) if j == 0 else (70, 80, 100),
                      font=font)
    return sheet


def write_contact_sheet(path: str | os.PathLike, results: Sequence[dict], item_of: Callable[[int], Item], cell: int = 192,
                        cols: int = 5) -> Path:
    """Render and write the sheet as PNG (atomically); an unwritable path raises
    :class:`rsitr.utils.io.OutputError` naming it (the CLI prints it as one line)."""
    img = render_sheet(results, item_of, cell, cols)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
