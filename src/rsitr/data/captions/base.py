"""What caption-format parsers produce and share: the images as parsed (:class:`RawImage`), the
problem sink (raise, or log and skip), and the facts of one load (:class:`LoadInfo`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rsitr.data.captions.paths import RESOLUTION_RULES
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)


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
class RawImage:
    """One image as parsed from an annotation, before validation and resolution."""

    image_id: str
    written: str  # the path as listed (filepath/filename for Karpathy)
    split: str | None  # None: the annotation does not say
    split_field: bool  # True when the split came from an explicit field (not a guess)
    captions: list[tuple[str, Any]] = field(default_factory=list)  # (where, caption value)
    label: str | None = None
    where: str = ""


class ProblemSink:
    """Raise a DataError, or (skip_bad) log it and remember it."""

    def __init__(self, skip: bool, info: LoadInfo):
        self.skip, self.info = skip, info

    def __call__(self, msg: str) -> None:
        if not self.skip:
            raise DataError(msg)
        log.warning("skipped: %s", msg)
        self.info.problems.append(msg)


@dataclass
class ParseContext:
    """What a parser may use besides the file: where problems go, the load's notes, and the
    ``split=`` the caller gave (None when not given)."""

    bad: ProblemSink
    info: LoadInfo
    split: str | None = None


def named_entries(entries: list, key: str, where_of: Callable[[int], str], bad: ProblemSink) -> Iterator[tuple[dict, str, str]]:
    """``(entry, name, where)`` for each entry of a JSON list that is an object with a non-empty
    string ``key`` (``name`` stripped; ``where`` = ``where_of(i)`` plus the name as written); every
    other entry goes to ``bad`` as "<where>: entry has no '<key>'"."""
    for i, it in enumerate(entries):
        name = it.get(key) if isinstance(it, dict) else None
        where = where_of(i) + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(name, str) or not name.strip():
            bad(f"{where}: entry has no {key!r}")
            continue
        yield it, name.strip(), where
