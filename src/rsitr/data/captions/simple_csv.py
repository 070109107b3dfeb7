"""The simple CSV format: ``image,caption[,split]`` with a header, one row per caption (column
aliases: image/filename/file/path/image_path/file_name/img, caption/text/sentence/raw/title).

Rows of one image are merged (:func:`~rsitr.data.captions.csvrows.images_from_rows`); a row's empty
split cell leaves the split to the other rows of the image or to ``split=``.
"""
from __future__ import annotations

from pathlib import Path

from rsitr.data.captions.csvrows import CsvFormat
from rsitr.data.captions.registry import register_format
from rsitr.utils.errors import DataError

IMAGE_COLUMNS = ("image", "filename", "file", "path", "image_path", "file_name", "img")
CAPTION_COLUMNS = ("caption", "text", "sentence", "raw", "title")


@register_format("csv")
class SimpleCsv(CsvFormat):
    expects = "'image,caption[,split]'"

    def recognises_header(self, header: list[str]) -> bool:
        return any(c in header for c in IMAGE_COLUMNS) and any(c in header for c in CAPTION_COLUMNS)

    def columns(self, path: Path, header: list[str]) -> tuple[int, int, int | None]:
        icol = next((header.index(c) for c in IMAGE_COLUMNS if c in header), -1)
        ccol = next((header.index(c) for c in CAPTION_COLUMNS if c in header), -1)
        if icol < 0 or ccol < 0:
            raise DataError(f"{path}: CSV needs the header 'image,caption[,split]', got {header}")
        return icol, ccol, header.index("split") if "split" in header else None
