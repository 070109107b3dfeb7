"""Several caption datasets as one training set (``data.sources`` in the training config).

One model for every dataset (e.g. UCM-Captions + RSICD) is trained on the union of their train
splits; each part keeps its own val and test split. The mix is a plain :class:`CaptionDataset`
whose entries are grouped by part (:meth:`CaptionDataset.parts`), each entry naming its part
(``ImageEntry.part``) and its image id prefixed ``"<part>/"`` so ids stay unique. Paths, captions
and order within a part are the part's own, so a frozen-trunk cache computed for one dataset alone
serves it inside any mix (:func:`rsitr.models.trunk_cache.build_trunk_cache` caches per part).

Sampling weights: a part's ``weight`` is its share of every epoch's training pairs
(:func:`rsitr.train.epochs.epoch_order`); without weights each part contributes in proportion to
its size, as a plain concatenation would. Validation and test score each part's split on its own
(the protocol ranks within one dataset) and report the mean over parts plus every part's metrics
(:func:`rsitr.eval.evaluate.evaluate_ties`).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rsitr.data.types import CaptionDataset, ImageEntry
from rsitr.utils.config import from_mapping
from rsitr.utils.errors import RsitrError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass
class Source:
    """One dataset of a mix: ``path`` as ``data.path`` takes it; ``name`` (default: the folder or
    file name) labels its metrics; ``weight`` its share of each epoch (all or none of a mix's
    sources give one); ``format``/``image_root``/``labels`` as the ``data`` keys of that name."""

    path: str = ""
    name: str | None = None
    weight: float | None = None
    format: str = "auto"
    image_root: str | None = None
    labels: str | None = None


def parse_sources(raw: Sequence[Any]) -> list[Source]:
    """``data.sources`` entries (mappings, or plain paths) checked: a path each, unique names,
    weights given for all or none and positive."""
    out: list[Source] = []
    for i, item in enumerate(raw):
        where = f"data.sources[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping):
            raise RsitrError(f"{where}: expected a mapping with a path (or a path), got {type(item).__name__}")
        src = from_mapping(Source, item, where)
        if not src.path:
            raise RsitrError(f"{where}: needs a path")
        if src.name is None:
            p = Path(src.path)
            src = dataclasses.replace(src, name=(p.stem if p.suffix else p.name) or f"part{i}")
        if not _NAME.match(src.name):
            raise RsitrError(f"{where}: name {src.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        if src.weight is not None and not src.weight > 0:
            raise RsitrError(f"{where}: weight must be > 0, got {src.weight}")
        out.append(src)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise RsitrError(f"data.sources: two sources share a name ({names}); give each a distinct name")
    if len({s.weight is None for s in out}) > 1:
        raise RsitrError("data.sources: give a weight to every source or to none (none: each in proportion to its size)")
    return out


def load_mixed(sources: Sequence[Source], load: Callable[[Source], CaptionDataset]) -> CaptionDataset:
    """The union of ``load(source)`` over ``sources``, grouped by source in the given order."""
    if not sources:
        raise RsitrError("data.sources is empty")
    entries, problems = [], []
    for src in sources:
        ds = load(src)
        for e in ds.entries:
            entries.append(dataclasses.replace(e, image_id=f"{src.name}/{e.image_id}", part=src.name))  # see own_image_id
        problems.extend(f"{src.name}: {p}" for p in ds.problems)
    return CaptionDataset(entries, "mixed", None, problems, part_weights={s.name: s.weight for s in sources})


def own_image_id(e: ImageEntry) -> str:
    """The id ``e`` has in its own dataset: a mix's entry without its ``<part>/`` prefix."""
    return e.image_id[len(e.part) + 1:] if e.part and e.image_id.startswith(f"{e.part}/") else e.image_id


__all__ = ["Source", "load_mixed", "own_image_id", "parse_sources"]
