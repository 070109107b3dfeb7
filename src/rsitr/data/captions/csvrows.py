"""What the CSV formats share: rows (one caption each) merged into images, and :class:`CsvFormat`,
a format that only says which headers it recognises and which columns hold what."""
from __future__ import annotations

from pathlib import Path

from rsitr.data.captions.base import ParseContext, ProblemSink, RawImage
from rsitr.data.captions.files import CsvTable
from rsitr.data.captions.registry import CaptionFormat


def images_from_rows(path: Path, table: CsvTable, icol: int, ccol: int, scol: int | None, bad: ProblemSink) -> list[RawImage]:
    """One :class:`RawImage` per image named in column ``icol``, with the captions of column
    ``ccol`` in row order and the split of column ``scol`` (None: no split column)."""
    header, rows = table
    need = max(icol, ccol, scol if scol is not None else -1) + 1
    by_id: dict[str, RawImage] = {}
    for line, row in rows:
        where = f"{path}: line {line}"
        if len(row) < need:
            bad(f"{where}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
            continue
        if len(row) > len(header):
            bad(f"{where}: {len(row)} fields, header has {len(header)} (unquoted comma in a caption?)")
            continue
        img = row[icol].strip()
        if not img:
            bad(f"{where}: empty image name")
            continue
        sp = row[scol].strip() if scol is not None and row[scol].strip() else None
        r = by_id.get(img)
        if r is None:
            r = by_id[img] = RawImage(image_id=img, written=img, split=sp, split_field=sp is not None, where=where)
        elif sp is not None and r.split is not None and sp != r.split:
            bad(f"{where}: image {img!r} is in split {sp!r} here but {r.split!r} on an earlier line")
            continue
        elif sp is not None and r.split is None:
            r.split, r.split_field = sp, True
        r.captions.append((where, row[ccol]))
    return list(by_id.values())


class CsvFormat(CaptionFormat):
    """A CSV caption format, one row per caption: subclasses give :meth:`recognises_header` and
    :meth:`columns`."""

    container = "csv"

    def recognises_header(self, header: list[str]) -> bool:
        raise NotImplementedError

    def columns(self, path: Path, header: list[str]) -> tuple[int, int, int | None]:
        """(image, caption, split or None) column indices; a DataError when the header lacks them."""
        raise NotImplementedError

    def recognises(self, path: Path, table: CsvTable) -> bool:
        return self.recognises_header(table[0])

    def parse(self, path: Path, table: CsvTable, ctx: ParseContext) -> list[RawImage]:
        icol, ccol, scol = self.columns(path, table[0])
        return images_from_rows(path, table, icol, ccol, scol, ctx.bad)
