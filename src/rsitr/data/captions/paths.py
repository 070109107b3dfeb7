"""Image paths of an annotation: resolution under the image root(s), and the file checks.

Each listed path is resolved by the first rule that finds an existing file:

1. ``as-written``: the path as listed, absolute, or relative to the image root;
2. ``trailing``: its trailing components, dropping leading ones one at a time
   (``/home/x/RSITMD/images/boat_0.tif`` -> ``x/RSITMD/images/boat_0.tif`` -> ... ->
   ``images/boat_0.tif``), relative to the image root;
3. ``basename``: the bare file name under the image root.

Each rule is tried on every root before the next rule. A path no rule finds is ``unresolved``
and keeps its as-written form. The file check reads headers only (``PIL.Image.open`` + ``size``),
in a thread pool.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable

RESOLUTION_RULES = ("as-written", "trailing", "basename", "unresolved")


def _parts(written: str) -> tuple[bool, list[str]]:
    """(is absolute, components) of a path written with / or \\ separators."""
    p = PureWindowsPath(written) if ("\\" in written or re.match(r"^[A-Za-z]:", written)) else PurePosixPath(written)
    parts = [x for x in p.parts if x not in ("/", "\\") and not re.fullmatch(r"[A-Za-z]:\\?", x)]
    return p.is_absolute() or written.startswith("/"), [x for x in parts if x not in ("", ".")]


def resolve_image_path(written: str, roots: list[Path], isfile: Callable[[str], bool] = os.path.isfile) -> tuple[Path, str]:
    """Resolve one listed path by the module's rules; returns (path, rule)."""
    absolute, parts = _parts(written)
    if not parts:
        return Path(written), "unresolved"
    first = Path("/", *parts) if absolute and not re.match(r"^[A-Za-z]:", written) else (Path(written) if absolute else None)
    if first is not None and isfile(str(first)):
        return first, "as-written"
    for root in roots:
        if not absolute:
            cand = root.joinpath(*parts)
            if isfile(str(cand)):
                return cand, "as-written"
    for k in range(1, len(parts) - 1):
        for root in roots:
            cand = root.joinpath(*parts[k:])
            if isfile(str(cand)):
                return cand, "trailing"
    for root in roots:
        cand = root / parts[-1]
        if isfile(str(cand)):
            return cand, "basename"
    if first is not None:
        return first, "unresolved"
    return roots[0].joinpath(*parts), "unresolved"


def check_image(path: Path) -> str | None:
    """Header-only check: None when PIL can open the file and read a non-empty size, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
        if w <= 0 or h <= 0:
            return f"empty image size {w}x{h}"
        return None
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
        return f"{type(exc).__name__}: {exc}"


def check_images_parallel(paths: list[Path], workers: int | None = None) -> list[str | None]:
    """:func:`check_image` over many files in a thread pool (I/O bound: header reads)."""
    if not paths:
        return []
    n = workers if workers and workers > 0 else min(32, (os.cpu_count() or 2) * 4)
    if n == 1 or len(paths) < 16:
        return [check_image(p) for p in paths]
    from rsitr.utils.progress import progress_bar

    with ThreadPoolExecutor(max_workers=n) as pool:
        it = pool.map(check_image, paths)
        return list(progress_bar(it, total=len(paths), desc="checking images", unit="img", leave=False,
                         disable=len(paths) <= 20000))
