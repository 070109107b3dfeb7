"""Splits: every image ends in ``train``, ``val`` or ``test``.

``split=`` gives the split of entries whose annotation has no split *field* (and replaces the
path-prefix guess of the PIR format). When neither exists, the split is read from the
annotation's file name if that names exactly one split as a word (``rsitmd_test.csv`` -> test,
logged); otherwise loading stops and asks for ``split=``. Aliases: restval -> train (COCO's
Karpathy split), valid/validation/dev -> val.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from rsitr.data.captions.base import LoadInfo, ProblemSink, RawImage
from rsitr.data.types import KNOWN_SPLITS
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"restval": "train", "valid": "val", "validation": "val", "dev": "val"}


def split_from_filename(path: str | Path) -> str | None:
    """The split a file name names as a word (``rsitmd_test.csv`` -> "test"), or None."""
    words = set(re.split(r"[^a-z]+", Path(path).stem.lower()))
    found = {SPLIT_ALIASES.get(w, w) for w in words} & set(KNOWN_SPLITS)
    return found.pop() if len(found) == 1 else None


def assign_splits(path: Path, raws: list[RawImage], split: str | None, bad: ProblemSink, info: LoadInfo) -> list[RawImage]:
    """Give every image a known split (see the module docstring); an unknown one is a problem."""
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
    out: list[RawImage] = []
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
