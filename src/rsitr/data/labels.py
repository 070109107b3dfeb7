"""Scene-class labels of caption datasets (the second task of RDB's DTCL).

Where labels come from, per dataset as it circulates:

- **File names** (RSICD, RSITMD, NWPU-Captions): ``parking_229.tif`` -> ``"parking"``,
  ``denseresidential_12.jpg`` -> ``"denseresidential"``, ``basketball_court_001.jpg`` ->
  ``"basketball_court"``, ``agricultural07.tif`` -> ``"agricultural"``. Purely numeric names
  (``00001.jpg`` in RSICD, ``1.tif`` in UCM/Sydney) carry no class: ``None``.
- **A labels CSV** ``filename,class[,...]`` with a header (UCM's ``labels.csv`` here; the synthetic
  benchmark writes one too). The file-name column may be called filename/image/file/name/path,
  the class column class/label/label_name/category/scene. Rows are matched to images by the
  image id, by the path as written, then by the base name.
- **UCM's order rule** (UCM-Captions numbers the UC Merced images in class order):
  ``k.tif`` is class ``(k - 1) // 100`` of the 21 alphabetical UC Merced classes. It is only
  applied when asked (``labels="ucm-order"``), never guessed.
- **Sydney-Captions** ships no label file in the circulating release (the Karpathy JSON only, with
  numeric names ``1.tif`` ... ``613.tif``); give its 7 scene classes as a labels CSV.
- The PIR/HarMA JSON carries ``label_name`` per entry; the loader uses it when no CSV is found.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from rsitr.data.csvfile import open_csv
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

# The 21 UC Merced Land Use classes in alphabetical order (Yang and Newsam, 2010).
UCM_CLASSES: tuple[str, ...] = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)
UCM_PER_CLASS = 100

LABEL_MODES = ("auto", "filename", "ucm-order", "none")  # or a path to a labels CSV

_FILENAME_COLUMNS = ("filename", "image", "file", "name", "path", "image_path", "file_name")
_CLASS_COLUMNS = ("class", "label", "label_name", "category", "scene", "class_name")
# a class name, an optional separator, then the image number: "parking_229", "agricultural07"
_NAME_RE = re.compile(r"^(?P<cls>[^\W\d_](?:[\w\- ]*?[^\W_])?)[_\- ]*\d+$")


def basename(name: str) -> str:
    """Last component of a path written with / or \\ separators (annotations come from any OS)."""
    return PureWindowsPath(name).name if "\\" in name else PurePosixPath(name).name


def label_from_filename(name: str) -> str | None:
    """Scene class encoded in an image file name, or None when the name carries none."""
    stem = basename(name).rsplit(".", 1)[0] if "." in basename(name) else basename(name)
    m = _NAME_RE.match(stem)
    return m.group("cls") if m else None


def ucm_order_label(name: str) -> str:
    """UCM-Captions order rule: ``k.tif`` -> ``UCM_CLASSES[(k - 1) // 100]``."""
    stem = basename(name).split(".", 1)[0]
    if not stem.isdigit() or not 1 <= int(stem) <= len(UCM_CLASSES) * UCM_PER_CLASS:
        raise DataError(f"{name}: labels='ucm-order' needs UCM-Captions names 1.tif ... 2100.tif, got {basename(name)!r}")
    return UCM_CLASSES[(int(stem) - 1) // UCM_PER_CLASS]


def looks_like_ucm(names: list[str]) -> bool:
    """2,100 numeric names 1..2100: UCM-Captions (the order rule would apply)."""
    if len(names) != len(UCM_CLASSES) * UCM_PER_CLASS:
        return False
    stems = {basename(n).split(".", 1)[0] for n in names}
    return stems == {str(k) for k in range(1, 2101)}


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """Read a ``filename,class[,...]`` CSV (header required) into {filename as written: class}."""
    path = Path(path)
    with open_csv(path, "labels CSV") as reader:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty labels CSV (expected a header 'filename,class')")
        cols = [h.strip().lower() for h in header]
        fcol = next((cols.index(c) for c in _FILENAME_COLUMNS if c in cols), None)
        ccol = next((cols.index(c) for c in _CLASS_COLUMNS if c in cols), None)
        if fcol is None or ccol is None:
            raise DataError(f"{path}: labels CSV header {header} needs a file-name column "
                            f"({'/'.join(_FILENAME_COLUMNS)}) and a class column ({'/'.join(_CLASS_COLUMNS)})")
        out: dict[str, str] = {}
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            line = reader.line_num
            if len(row) <= max(fcol, ccol):
                raise DataError(f"{path}: line {line}: {len(row)} fields, expected at least {max(fcol, ccol) + 1}")
            name, cls = row[fcol].strip(), row[ccol].strip()
            if not name or not cls:
                raise DataError(f"{path}: line {line}: empty file name or class")
            if name in out and out[name] != cls:
                raise DataError(f"{path}: line {line}: {name!r} labelled both {out[name]!r} and {cls!r}")
            out[name] = cls
    if not out:
        raise DataError(f"{path}: labels CSV has no rows")
    return out


class LabelTable:
    """A labels CSV matched to images by id, by the path as written, then by base name."""

    def __init__(self, mapping: dict[str, str], source: Path | None = None):
        self.mapping = mapping
        self.source = source
        by_base: dict[str, str | None] = {}
        for name, cls in mapping.items():
            b = basename(name)
            # two different rows with one base name and different classes: ambiguous, not used
            by_base[b] = cls if by_base.get(b, cls) == cls else None
        self.by_base = by_base

    @classmethod
    def from_csv(cls, path: str | Path) -> "LabelTable":
        return cls(read_labels_csv(path), Path(path))

    def lookup(self, image_id: str, written: str | None = None) -> str | None:
        for key in (image_id, written):
            if key is not None and key in self.mapping:
                return self.mapping[key]
        return self.by_base.get(basename(written or image_id))
