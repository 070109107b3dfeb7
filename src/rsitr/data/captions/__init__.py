"""Every caption-file format in circulation, one loader: :func:`load_dataset`.

Formats (detected from the file's content, or forced with ``format=``):

``karpathy``
    ``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...], "filepath"?}]}`` as
    RSICD, RSITMD, UCM-Captions and Sydney-Captions ship it (RSITMD's ``.tif`` names, UCM's
    numeric ``1.tif``, any number of sentences per image). A sentence without ``raw`` falls back
    to its joined ``tokens``. ``filepath`` is prefixed to the file name when present. Split
    ``restval`` (COCO's Karpathy split) is read as ``train`` (logged). NWPU-Captions' variant,
    ``{"<class>": [{"filename", "split", "raw", "raw_1", ..., "raw_4"}]}`` (images under
    ``<class>/``), is read as the same format, with the class key as the scene label.
``pir``
    The PIR/HarMA JSON list ``[{"image": "test/parking_229.tif", "caption": str | [str, ...]}]``.
    Entries of one image are merged (RSITMD's train file: 17,175 entries -> 3,435 images); the
    split comes from the path prefix ``train/``, ``val/``, ``test/``. ``label_name`` is kept.
``iebaker-csv``
    ``filename,title``, one row per caption (iEBAKER's ``rsitmd_test.csv``); the file name may
    be an absolute path from another machine (``/home/.../RSITMD/images/boat_0.tif``).
``csv``
    ``image,caption[,split]`` with a header, one row per caption (column aliases: image/filename/
    file/path, caption/text/sentence/raw/title).

Splits. Every image ends in ``train``, ``val`` or ``test``; any other name is an error.
``split=`` gives the split of entries whose annotation has no split *field* (iEBAKER CSV rows,
CSV rows with an empty or absent split column, Karpathy images without ``split``), and it
replaces the path-prefix guess of the PIR format. When neither exists, the split is read from the
annotation's file name if that names exactly one split as a word (``rsitmd_test.csv`` -> test,
logged); otherwise loading stops and asks for ``split=`` (CLI: ``--split``).

Image paths. Each listed path is resolved by the first rule that finds an existing file:

1. ``as-written``: the path as listed, absolute, or relative to the image root;
2. ``trailing``: its trailing components, dropping leading ones one at a time
   (``/home/x/RSITMD/images/boat_0.tif`` -> ``x/RSITMD/images/boat_0.tif`` -> ... ->
   ``images/boat_0.tif``), relative to the image root;
3. ``basename``: the bare file name under the image root.

The image root is ``image_root=`` when given; otherwise the annotation's folder, then its
``images/`` subfolder (each rule is tried on both roots before the next rule). A path no rule finds
is ``unresolved`` and keeps its as-written form. The counts per rule are attached to the returned
dataset as ``dataset.load_info.resolution`` (see :class:`LoadInfo`) and logged.

Validation. A :class:`~rsitr.utils.errors.DataError` names the file and entry for: malformed
JSON/CSV (with line and column), an entry without image or captions, an empty caption, an
unknown split, a duplicate image id (Karpathy; PIR/CSV rows of one image are merged by design),
a missing image file and an unreadable one (header check only: ``PIL.Image.open`` + ``size``, in
a thread pool). With ``skip_bad=True`` each problem is logged, recorded in
``dataset.problems`` and skipped (an image left with no captions is dropped); malformed files
still raise. ``check_images=False`` skips the file checks (paths are still resolved).

Scene labels: see :mod:`rsitr.data.labels` (``labels=`` None/"auto", a CSV path, "filename",
"ucm-order", "none").
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from rsitr.data.labels import LabelTable, label_from_filename, looks_like_ucm, ucm_order_label
from rsitr.data.types import KNOWN_SPLITS, CaptionDataset, ImageEntry
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("karpathy", "pir", "iebaker-csv", "csv")
RESOLUTION_RULES = ("as-written", "trailing", "basename", "unresolved")
SPLIT_ALIASES = {"restval": "train", "valid": "val", "validation": "val", "dev": "val"}

_IMAGE_COLUMNS = ("image", "filename", "file", "path", "image_path", "file_name", "img")
_CAPTION_COLUMNS = ("caption", "text", "sentence", "raw", "title")


# -- what the loader learnt on the way ------------------------------------------------------------
@dataclass
class LoadInfo:
    """Side facts of one load, attached to the dataset as ``dataset.load_info``.

    resolution: images resolved by each rule (``RESOLUTION_RULES``).
    missing / unreadable: ``(image_id, path, reason)`` of images that failed the file check
        (only filled when ``check_images``; in ``load_dataset`` these are errors or skipped).
    problems: entry problems that were skipped (same lines as ``dataset.problems``).
    notes: things worth telling the user (split guessed from file name, restval read as train...).
    """

    format: str
    files: list[Path]
    image_roots: list[Path]
    resolution: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RESOLUTION_RULES})
    missing: list[tuple[str, str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_source: str = "none"
    images_checked: bool = False


@dataclass
class _Raw:
    """One image as parsed from an annotation, before validation and resolution."""

    image_id: str
    written: str  # the path as listed (filepath/filename for Karpathy)
    split: str | None  # None: the annotation does not say
    split_field: bool  # True when the split came from an explicit field (not a guess)
    captions: list[tuple[str, Any]] = field(default_factory=list)  # (where, caption value)
    label: str | None = None
    where: str = ""


class _Sink:
    """Raise a DataError, or (skip_bad) log it and remember it."""

    def __init__(self, skip: bool, info: LoadInfo):
        self.skip, self.info = skip, info

    def __call__(self, msg: str) -> None:
        if not self.skip:
            raise DataError(msg)
        log.warning("skipped: %s", msg)
        self.info.problems.append(msg)


# -- reading files --------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation ({exc})") from exc


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, row) pairs; blank lines skipped."""
    rows: list[tuple[int, list[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, strict=True)
            header = next(reader, None)
            for row in reader:
                if row and any(c.strip() for c in row):
                    rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV near line {reader.line_num}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation ({exc})") from exc
    if not header or all(not h.strip() for h in header):
        raise DataError(f"{path}: empty CSV (a header such as 'image,caption[,split]' is required)")
    return [h.strip().lower() for h in header], rows


def _looks_json(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return False
    with open(path, "rb") as fh:
        head = fh.read(256).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] in (b"[", b"{")


def detect_format(path: str | Path) -> str:
    """The caption format of an annotation file (see the module docstring)."""
    path = Path(path)
    if _looks_json(path):
        return _json_format(path, _read_json(path))
    header, _ = _read_csv(path)
    return _csv_format(path, header)


def _json_format(path: Path, obj: Any) -> str:
    if isinstance(obj, dict):
        if isinstance(obj.get("images"), list):
            return "karpathy"
        if obj and all(isinstance(v, list) and v and isinstance(v[0], dict) and "filename" in v[0] for v in obj.values()):
            return "karpathy"  # NWPU-Captions' class-keyed variant
    if isinstance(obj, list) and obj and isinstance(obj[0], dict) and "image" in obj[0] and "caption" in obj[0]:
        return "pir"
    kind = type(obj).__name__
    raise DataError(f"{path}: unrecognised JSON layout ({kind}); expected a Karpathy object with 'images' "
                    f"or a PIR/HarMA list of {{'image', 'caption'}} entries")


def _csv_format(path: Path, header: list[str]) -> str:
    if "filename" in header and "title" in header and "split" not in header and "caption" not in header:
        return "iebaker-csv"
    if any(c in header for c in _IMAGE_COLUMNS) and any(c in header for c in _CAPTION_COLUMNS):
        return "csv"
    raise DataError(f"{path}: unrecognised CSV header {header}; expected 'filename,title' (iEBAKER) or 'image,caption[,split]'")


# -- parsers: file -> list[_Raw] ------------------------------------------------------------------
def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def _parse_karpathy(path: Path, obj: Any, bad: _Sink, info: LoadInfo) -> list[_Raw]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a Karpathy annotation is a JSON object with an 'images' list")
    out: list[_Raw] = []
    if "images" not in obj:  # NWPU-Captions: {class: [{filename, split, raw, raw_1..raw_4}]}
        for cls, items in obj.items():
            if not isinstance(items, list):
                raise DataError(f"{path}: key {cls!r}: expected a list of images")
            for i, it in enumerate(items):
                where = f"{path}: {cls}[{i}]"
                if not isinstance(it, dict) or not isinstance(it.get("filename"), str) or not it["filename"].strip():
                    bad(f"{where}: entry has no 'filename'")
                    continue
                keys = sorted((k for k in it if k == "raw" or re.fullmatch(r"raw_\d+", k)),
                              key=lambda k: 0 if k == "raw" else int(k[4:]))
                r = _Raw(image_id=_join(cls, it["filename"].strip()), written=_join(cls, it["filename"].strip()),
                         split=it.get("split"), split_field="split" in it, label=str(cls), where=where)
                r.captions = [(f"{where} {k}", it[k]) for k in keys]
                out.append(r)
        return out
    images = obj["images"]
    if not isinstance(images, list):
        raise DataError(f"{path}: 'images' must be a list")
    untokenised = 0
    for i, it in enumerate(images):
        name = it.get("filename") if isinstance(it, dict) else None
        where = f"{path}: images[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(name, str) or not name.strip():
            bad(f"{where}: entry has no 'filename'")
            continue
        written = _join(str(it.get("filepath") or "").strip(), name.strip())
        r = _Raw(image_id=written, written=written, split=it.get("split"), split_field="split" in it, where=where)
        sents = it.get("sentences")
        if not isinstance(sents, list):
            bad(f"{where}: 'sentences' missing or not a list")
            continue
        for k, s in enumerate(sents):
            if isinstance(s, dict) and "raw" not in s and isinstance(s.get("tokens"), list):
                untokenised += 1
                s = {"raw": " ".join(map(str, s["tokens"]))}
            r.captions.append((f"{where} sentences[{k}]", s.get("raw") if isinstance(s, dict) else s))
        out.append(r)
    if untokenised:
        info.notes.append(f"{untokenised} sentences had no 'raw' text; their tokens were joined")
    return out


def _parse_pir(path: Path, obj: Any, bad: _Sink, info: LoadInfo, split: str | None) -> list[_Raw]:
    if not isinstance(obj, list):
        raise DataError(f"{path}: a PIR/HarMA annotation is a JSON list of {{'image', 'caption'}} entries")
    by_id: dict[str, _Raw] = {}
    for i, it in enumerate(obj):
        img = it.get("image") if isinstance(it, dict) else None
        where = f"{path}: entry {i}" + (f" ({img})" if isinstance(img, str) else "")
        if not isinstance(img, str) or not img.strip():
            bad(f"{where}: entry has no 'image'")
            continue
        if "caption" not in it:
            bad(f"{where}: entry has no 'caption'")
            continue
        img = img.strip()
        r = by_id.get(img)
        if r is None:
            prefix = img.replace("\\", "/").split("/", 1)[0] if "/" in img.replace("\\", "/") else None
            guess = prefix if split is None and prefix in KNOWN_SPLITS else None
            label = it.get("label_name") if isinstance(it.get("label_name"), str) else None
            r = by_id[img] = _Raw(image_id=img, written=img, split=guess, split_field=False, label=label, where=where)
        caps = it["caption"] if isinstance(it["caption"], list) else [it["caption"]]
        r.captions.extend((f"{where} caption[{k}]" if isinstance(it["caption"], list) else where, c) for k, c in enumerate(caps))
    if len(by_id) < len(obj):
        info.notes.append(f"{len(obj)} entries merged into {len(by_id)} images")
    return list(by_id.values())


def _parse_csv(path: Path, fmt: str, bad: _Sink) -> list[_Raw]:
    header, rows = _read_csv(path)
    if fmt == "iebaker-csv":
        if "filename" not in header or "title" not in header:
            raise DataError(f"{path}: iEBAKER CSV needs the header 'filename,title', got {header}")
        icol, ccol, scol = header.index("filename"), header.index("title"), None
    else:
        icol = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), -1)
        ccol = next((header.index(c) for c in _CAPTION_COLUMNS if c in header), -1)
        scol = header.index("split") if "split" in header else None
        if icol < 0 or ccol < 0:
            raise DataError(f"{path}: CSV needs the header 'image,caption[,split]', got {header}")
    need = max(icol, ccol, scol if scol is not None else -1) + 1
    by_id: dict[str, _Raw] = {}
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
            r = by_id[img] = _Raw(image_id=img, written=img, split=sp, split_field=sp is not None, where=where)
        elif sp is not None and r.split is not None and sp != r.split:
            bad(f"{where}: image {img!r} is in split {sp!r} here but {r.split!r} on an earlier line")
            continue
        elif sp is not None and r.split is None:
            r.split, r.split_field = sp, True
        r.captions.append((where, row[ccol]))
    return list(by_id.values())


# -- splits ----------------------------------------------------------------------------------------
def split_from_filename(path: str | Path) -> str | None:
    """The split a file name names as a word (``rsitmd_test.csv`` -> "test"), or None."""
    words = set(re.split(r"[^a-z]+", Path(path).stem.lower()))
    found = {SPLIT_ALIASES.get(w, w) for w in words} & set(KNOWN_SPLITS)
    return found.pop() if len(found) == 1 else None


def _assign_splits(path: Path, raws: list[_Raw], split: str | None, bad: _Sink, info: LoadInfo) -> list[_Raw]:
    if split is not None:
        split = SPLIT_ALIASES.get(split, split)
        if split not in KNOWN_SPLITS:
            raise DataError(f"split={split!r}: must be one of {', '.join(KNOWN_SPLITS)}")
    unset = [r for r in raws if r.split is None]
    fill = split
    if unset and fill is None:
        fill = split_from_filename(path)
        if fill is None:
            raise DataError(f"{path}: {len(unset)} image(s) have no split (e.g. {unset[0].image_id!r}) and the file name "
                            f"does not name one; pass split='train'|'val'|'test' (CLI: --split)")
        info.notes.append(f"split '{fill}' taken from the file name {path.name} for {len(unset)} image(s)")
        log.info("%s: no split in the annotation; using '%s' from the file name", path, fill)
    out: list[_Raw] = []
    restval = 0
    for r in raws:
        if r.split is None:
            r.split = fill
        if not isinstance(r.split, str):
            bad(f"{r.where}: split {r.split!r} is not a name")
            continue
        s = r.split.strip().lower()
        if s == "restval":
            restval += 1
        s = SPLIT_ALIASES.get(s, s)
        if s not in KNOWN_SPLITS:
            bad(f"{r.where}: unknown split {r.split!r} (expected {', '.join(KNOWN_SPLITS)} or restval)")
            continue
        r.split = s
        out.append(r)
    if restval:
        info.notes.append(f"{restval} 'restval' images read as train")
        log.info("%s: %d 'restval' images read as train", path, restval)
    return out


# -- captions and ids ------------------------------------------------------------------------------
def _clean_captions(raws: list[_Raw], bad: _Sink) -> list[tuple[_Raw, list[str]]]:
    out = []
    for r in raws:
        caps: list[str] = []
        for where, c in r.captions:
            if not isinstance(c, str):
                bad(f"{where}: caption is {type(c).__name__}, not text")
                continue
            c = c.strip()
            if not c:
                bad(f"{where}: empty caption")
                continue
            caps.append(c)
        if not caps:
            if r.captions:  # all were bad and skipped (otherwise bad() raised)
                bad(f"{r.where}: image {r.image_id!r} has no valid caption left; dropped")
            else:
                bad(f"{r.where}: image {r.image_id!r} has no captions")
            continue
        out.append((r, caps))
    return out


def _dedupe_ids(raws: list[_Raw], bad: _Sink) -> list[_Raw]:
    first: dict[str, _Raw] = {}
    out = []
    for r in raws:
        if r.image_id in first:
            bad(f"{r.where}: duplicate image id {r.image_id!r} (first listed at {first[r.image_id].where.split(': ', 1)[-1]})")
            continue
        first[r.image_id] = r
        out.append(r)
    return out


# -- image paths -----------------------------------------------------------------------------------
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
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=n) as pool:
        it = pool.map(check_image, paths)
        return list(tqdm(it, total=len(paths), desc="checking images", unit="img", leave=False,
                         disable=None if len(paths) > 20000 else True))


# -- folders ---------------------------------------------------------------------------------------
def find_annotations(folder: Path) -> list[Path]:
    """Annotation file(s) of a dataset folder: ``dataset*.json``, else ``*.json``, else ``*.csv``.

    One file is returned, or several PIR files that together form the dataset (e.g. PIR's
    ``rsitmd_train.json``, ``rsitmd_val.json``, ``rsitmd_test.json``); anything else ambiguous is
    an error asking for the file."""
    for pattern in ("dataset*.json", "*.json", "*.csv"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
        if pattern == "*.csv":
            found = [p for p in found if p.name.lower() != "labels.csv"]
        if len(found) == 1:
            return found
        if len(found) > 1:
            if pattern != "*.csv" and all(detect_format(p) == "pir" for p in found):
                return found
            raise DataError(f"{folder}: several annotation files ({', '.join(p.name for p in found)}); pass one of them")
    raise DataError(f"{folder}: no annotation file (dataset*.json, *.json or *.csv) in this folder")


# -- the loader ------------------------------------------------------------------------------------
def load_dataset(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    labels: str | os.PathLike | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
    workers: int | None = None,
) -> CaptionDataset:
    """Load a caption dataset from an annotation file or a dataset folder (see the module
    docstring for formats, split and path rules, and validation). The result carries
    ``load_info`` (:class:`LoadInfo`) with the path-resolution counts."""
    ds, _ = _load(path, format=format, image_root=image_root, split=split, labels=labels, skip_entries=skip_bad,
                  images="skip" if skip_bad else "raise", check_images=check_images, workers=workers)
    return ds


def _load(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    labels: str | os.PathLike | None = None,
    skip_entries: bool = False,
    images: str = "raise",  # "raise" | "skip" | "keep" (keep: report only, used by data check)
    check_images: bool = True,
    workers: int | None = None,
) -> tuple[CaptionDataset, LoadInfo]:
    t0 = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such annotation file or dataset folder")
    folder = path if path.is_dir() else path.parent
    files = find_annotations(path) if path.is_dir() else [path]
    fmt_arg = (format or "auto").lower()
    if fmt_arg not in ("auto", *FORMATS):
        raise DataError(f"format={format!r}: must be auto or one of {', '.join(FORMATS)}")
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise DataError(f"image root {root}: no such folder")
        roots = [root]
    else:
        roots = [folder] + ([folder / "images"] if (folder / "images").is_dir() else [])
    info = LoadInfo(format="", files=files, image_roots=roots)
    bad = _Sink(skip_entries, info)

    raws: list[_Raw] = []
    fmts: list[str] = []
    for f in files:
        if _looks_json(f) or fmt_arg in ("karpathy", "pir"):
            obj = _read_json(f)
            fmt = _json_format(f, obj) if fmt_arg == "auto" else fmt_arg
            if fmt not in ("karpathy", "pir"):
                raise DataError(f"{f}: format={fmt!r} is a CSV format but the file is JSON")
            part = _parse_karpathy(f, obj, bad, info) if fmt == "karpathy" else _parse_pir(f, obj, bad, info, split)
        else:
            fmt = _csv_format(f, _read_csv(f)[0]) if fmt_arg == "auto" else fmt_arg
            part = _parse_csv(f, fmt, bad)
        part = _assign_splits(f, part, split, bad, info)
        fmts.append(fmt)
        raws.extend(part)
        log.info("%s: %s format, %d images", f, fmt, len(part))
    info.format = fmts[0] if len(set(fmts)) == 1 else "+".join(dict.fromkeys(fmts))
    raws = _dedupe_ids(raws, bad)  # PIR/CSV rows were merged per image already; this catches Karpathy repeats
    kept = _clean_captions(raws, bad)

    # paths
    entries: list[ImageEntry] = []
    rules: list[str] = []
    for r, caps in kept:
        p, rule = resolve_image_path(r.written, roots)
        info.resolution[rule] += 1
        rules.append(rule)
        entries.append(ImageEntry(image_id=r.image_id, path=p, split=r.split or "", captions=caps))
    log.info("image paths resolved under %s: %s", ", ".join(map(str, roots)),
             ", ".join(f"{k} {v}" for k, v in info.resolution.items() if v))

    # files
    if check_images and entries:
        info.images_checked = True
        found = [e.path for e, rule in zip(entries, rules) if rule != "unresolved"]
        it = iter(check_images_parallel(found, workers))
        reasons = ["missing" if rule == "unresolved" else next(it) for rule in rules]
        keep: list[ImageEntry] = []
        for e, (r, _), why in zip(entries, kept, reasons):
            if why is None:
                keep.append(e)
                continue
            rec = (e.image_id, str(e.path), why)
            (info.missing if why == "missing" else info.unreadable).append(rec)
            msg = (f"{r.where}: image file not found (looked for {r.written!r} under {', '.join(map(str, roots))})"
                   if why == "missing" else f"{r.where}: unreadable image {e.path} ({why})")
            if images == "raise":
                raise DataError(msg + ("; pass --image-root / image_root=" if why == "missing" and image_root is None else ""))
            if images == "skip":
                log.warning("skipped: %s", msg)
                info.problems.append(msg)
            else:
                keep.append(e)
        entries = keep

    # labels
    label_of = {r.image_id: r.label for r, _ in kept}
    written_of = {r.image_id: r.written for r, _ in kept}
    _apply_labels(entries, labels, folder, label_of, written_of, info)

    shared = sum(n - 1 for n in Counter(e.path for e in entries).values() if n > 1)
    if shared:
        info.notes.append(f"{shared} image ids resolve to a file already used by another id")
        log.warning("%s: %d image ids resolve to a file already used by another id (check image_root)", path, shared)
    ds = CaptionDataset(entries, format=info.format, source=path, problems=list(info.problems))
    ds.load_info = info  # type: ignore[attr-defined]  # extra facts; CaptionDataset is a plain dataclass
    for n in info.notes:
        log.info("%s: %s", path, n)
    log.info("%s: %d images, %d captions, splits %s (%.2fs)", path, len(ds), ds.n_captions, ds.splits, time.perf_counter() - t0)
    return ds, info


def _apply_labels(entries: list[ImageEntry], labels: Any, folder: Path, label_of: dict[str, str | None],
                  written_of: dict[str, str], info: LoadInfo) -> None:
    mode = "auto" if labels is None else str(labels)
    if mode == "none":
        info.label_source = "none"
        return
    if mode == "ucm-order":
        for e in entries:
            e.label = ucm_order_label(written_of[e.image_id])
        info.label_source = "ucm-order"
    elif mode == "filename":
        for e in entries:
            e.label = label_from_filename(written_of[e.image_id])
        info.label_source = "filename"
    elif mode == "auto":
        csv_path = folder / "labels.csv"
        if csv_path.is_file():
            table = LabelTable.from_csv(csv_path)
            for e in entries:
                e.label = table.lookup(e.image_id, written_of[e.image_id])
            info.label_source = f"csv:{csv_path}"
        else:  # per image: the annotation's own label (PIR label_name, NWPU class key), else the file name
            used = Counter()
            for e in entries:
                e.label = label_of.get(e.image_id)
                if e.label is None:
                    e.label = label_from_filename(written_of[e.image_id])
                    used["filename"] += e.label is not None
                else:
                    used["annotation"] += 1
            info.label_source = "+".join(k for k in ("annotation", "filename") if used[k]) or "none"
    else:
        csv_path = Path(mode)
        if not csv_path.is_file():
            raise DataError(f"labels={mode!r}: not a file and not one of auto, filename, ucm-order, none")
        table = LabelTable.from_csv(csv_path)
        for e in entries:
            e.label = table.lookup(e.image_id, written_of[e.image_id])
        info.label_source = f"csv:{csv_path}"
    missing = [e.image_id for e in entries if e.label is None]
    if missing and len(missing) < len(entries):
        log.info("%d of %d images have no scene label (e.g. %s, source %s): no classification task",
                 len(missing), len(entries), missing[0], info.label_source)
        info.notes.append(f"{len(missing)} of {len(entries)} images have no scene label (e.g. {missing[0]}); classes is None")
    elif missing:
        hint = " (UCM-like numeric names: labels='ucm-order' applies the UCM order rule)" if looks_like_ucm(list(written_of.values())) else ""
        log.info("no scene labels found (source %s)%s", info.label_source, hint)
        info.notes.append(f"no scene labels{hint}")
