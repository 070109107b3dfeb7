"""Reading annotation files: text, JSON and CSV, every failure a DataError naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsitr.data.csvfile import open_csv
from rsitr.utils.errors import DataError

CsvTable = tuple[list[str], list[tuple[int, list[str]]]]  # lower-cased header, (line number, row)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation ({exc})") from exc


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def read_csv(path: Path) -> CsvTable:
    """Header and (line number, row) pairs; blank lines skipped."""
    rows: list[tuple[int, list[str]]] = []
    with open_csv(path, "annotation") as reader:
        header = next(reader, None)
        for row in reader:
            if row and any(c.strip() for c in row):
                rows.append((reader.line_num, row))
    if not header or all(not h.strip() for h in header):
        raise DataError(f"{path}: empty CSV (a header such as 'image,caption[,split]' is required)")
    return [h.strip().lower() for h in header], rows


def looks_json(path: Path) -> bool:
    """JSON by suffix (.json), CSV by suffix (.csv/.tsv/.txt), else by the first character."""
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return False
    with open(path, "rb") as fh:
        head = fh.read(256).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] in (b"[", b"{")
