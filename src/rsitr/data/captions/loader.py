"""Loading a caption dataset: :func:`load_dataset` (see :mod:`rsitr.data.captions` for the rules).

Per annotation file: read it (JSON or CSV), find its format in the registry (or take the forced
one), parse it into :class:`~rsitr.data.captions.base.RawImage` entries, assign splits; then, over
all files: drop duplicate ids and bad captions, resolve image paths, check the image files, attach
scene labels.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

from rsitr.data.captions.base import LoadInfo, ParseContext, ProblemSink, RawImage
from rsitr.data.captions.paths import check_images_parallel, resolve_image_path
from rsitr.data.captions.registry import container_of, detect_format, get_format, list_formats, read_content, recognise
from rsitr.data.captions.scene_labels import apply_labels
from rsitr.data.captions.splits import assign_splits
from rsitr.data.types import CaptionDataset, ImageEntry
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)


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
    ds, _ = load_with_info(path, format=format, image_root=image_root, split=split, labels=labels, skip_entries=skip_bad,
                  images="skip" if skip_bad else "raise", check_images=check_images, workers=workers)
    return ds


def load_with_info(
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
    """:func:`load_dataset` with the problem handling spelled out, returning ``(dataset, info)``:
    ``skip_entries`` skips bad annotation entries; ``images`` says what a missing or unreadable
    image does ("raise", "skip", or "keep": only recorded in ``info``, as ``rsitr data check`` wants)."""
    t0 = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such annotation file or dataset folder")
    folder = path if path.is_dir() else path.parent
    files = find_annotations(path) if path.is_dir() else [path]
    fmt_arg = (format or "auto").lower()
    if fmt_arg != "auto" and fmt_arg not in list_formats():
        raise DataError(f"format={format!r}: must be auto or one of {', '.join(list_formats())}")
    forced = None if fmt_arg == "auto" else get_format(fmt_arg)
    if image_root is not None:
        root = Path(image_root)
        if not root.is_dir():
            raise DataError(f"image root {root}: no such folder")
        roots = [root]
    else:
        roots = [folder] + ([folder / "images"] if (folder / "images").is_dir() else [])
    info = LoadInfo(format="", files=files, image_roots=roots)
    bad = ProblemSink(skip_entries, info)
    ctx = ParseContext(bad, info, split)

    raws: list[RawImage] = []
    fmts: list[str] = []
    for f in files:
        container = "json" if container_of(f) == "json" or (forced is not None and forced.container == "json") else "csv"
        content = read_content(f, container)
        fmt = recognise(f, container, content) if forced is None else forced
        if fmt.container != container:
            raise DataError(f"{f}: format={fmt.name!r} is a {fmt.container.upper()} format but the file is {container.upper()}")
        part = assign_splits(f, fmt.parse(f, content, ctx), split, bad, info)
        fmts.append(fmt.name)
        raws.extend(part)
        log.info("%s: %s format, %d images", f, fmt.name, len(part))
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
    apply_labels(entries, labels, folder, label_of, written_of, info)

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


def _clean_captions(raws: list[RawImage], bad: ProblemSink) -> list[tuple[RawImage, list[str]]]:
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


def _dedupe_ids(raws: list[RawImage], bad: ProblemSink) -> list[RawImage]:
    first: dict[str, RawImage] = {}
    out = []
    for r in raws:
        if r.image_id in first:
            bad(f"{r.where}: duplicate image id {r.image_id!r} (first listed at {first[r.image_id].where.split(': ', 1)[-1]})")
            continue
        first[r.image_id] = r
        out.append(r)
    return out
