"""One logging set-up for the CLI (library code only calls ``logging.getLogger(__name__)``)."""
from __future__ import annotations

import logging


# loggers of libraries that report, at INFO, things that are not the user's concern or that rsitr
# reports itself: faiss's loader ("Could not load library with AVX2 support ..." on every start on a
# CPU or wheel without it) and rasterio's GDAL error hook (the error of an unreadable raster, which
# rsitr puts into its own one-line message: logged too, it was printed twice)
QUIET_LOGGERS = ("faiss.loader", "rasterio._env")


def quiet_library_logs() -> None:
    """Raise :data:`QUIET_LOGGERS` to WARNING (called where faiss / rasterio are imported)."""
    for name in QUIET_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level < logging.WARNING:
            lg.setLevel(logging.WARNING)


def setup_logging(verbose: int = 0) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
