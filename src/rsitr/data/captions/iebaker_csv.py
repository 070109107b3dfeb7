"""The iEBAKER CSV format: ``filename,title``, one row per caption (iEBAKER's ``rsitmd_test.csv``).

No split column (the split comes from ``split=`` or the file name); the file name may be an
absolute path from another machine (``/home/.../RSITMD/images/boat_0.tif``), which path
resolution maps to the image root. Registered before the simple CSV, whose column aliases would
also accept this header.
"""
from __future__ import annotations

from pathlib import Path

from rsitr.data.captions.csvrows import CsvFormat
from rsitr.data.captions.registry import register_format
from rsitr.utils.errors import DataError


@register_format("iebaker-csv")
class IebakerCsv(CsvFormat):
    expects = "'filename,title' (iEBAKER)"

    def recognises_header(self, header: list[str]) -> bool:
        return "filename" in header and "title" in header and "split" not in header and "caption" not in header

    def columns(self, path: Path, header: list[str]) -> tuple[int, int, int | None]:
        if "filename" not in header or "title" not in header:
            raise DataError(f"{path}: iEBAKER CSV needs the header 'filename,title', got {header}")
        return header.index("filename"), header.index("title"), None
