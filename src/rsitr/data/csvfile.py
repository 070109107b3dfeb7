"""Opening a CSV file the way every data reader here does: UTF-8 (a BOM is dropped), strict
quoting, and every decoding or I/O failure raised as a :class:`~rsitr.utils.errors.DataError` that
names the file (and the line, for malformed CSV)."""
from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rsitr.utils.errors import DataError


@contextmanager
def open_csv(path: Path, what: str) -> Iterator[Any]:
    """A strict ``csv.reader`` over ``path``; errors raised while reading it inside the ``with``
    block become DataErrors (``what`` names the file's role: "annotation", "labels CSV")."""
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, strict=True)
            yield reader
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV near line {reader.line_num if reader else 0}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from exc
