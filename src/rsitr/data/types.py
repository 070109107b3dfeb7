"""In-memory form of every caption dataset, whatever file format it came from."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rsitr.utils.errors import DataError

KNOWN_SPLITS = ("train", "val", "test")


@dataclass
class ImageEntry:
    """One image and all its captions.

    image_id: the image's key as listed in the annotation (e.g. ``"train/bridge_942.tif"`` or
              ``"1.tif"``); unique within a dataset.
    path:     resolved path of the image file (may not exist if images were not checked).
    split:    "train" | "val" | "test" (other names are rejected at load time).
    captions: the raw caption strings, in file order.
    label:    scene class name, or None when the dataset has no labels.
    """

    image_id: str
    path: Path
    split: str
    captions: list[str]
    label: str | None = None
    part: str | None = None  # the dataset it came from, in a training mix of several (see rsitr.data.mixed)


def normalise_caption(text: str) -> str:
    """A caption compared as text: lower case, runs of whitespace one space, trimmed (duplicate
    captions in ``rsitr data check``, same-sentence pairs of ``method.false_negatives: mask``)."""
    return " ".join(text.lower().split())


def _caption_key(caption: str) -> str:
    return normalise_caption(caption.casefold()).rstrip(" .!?;,")


def distinct_captions(captions: list[str]) -> int:
    """How many different sentences an image's captions are (case, spacing and end punctuation
    ignored): 1 for RSICD's images whose five captions are one sentence repeated."""
    return len({_caption_key(c) for c in captions})


def parse_distinct_filter(text: str) -> int:
    """N of a split filter ``distinct>=N`` (see :meth:`CaptionDataset.split`); DataError otherwise."""
    key, op, value = text.strip().partition(">=")
    if key.strip() != "distinct" or not op or not value.strip().isdigit() or int(value) < 1:
        raise DataError(f"split filter {text.strip()!r}: the one filter is 'distinct>=N' (N >= 1), e.g. val:distinct>=2")
    return int(value)


@dataclass
class CaptionDataset:
    entries: list[ImageEntry]
    format: str = "unknown"  # "karpathy" | "pir" | "iebaker-csv" | "csv" | "synth" | "mixed"
    source: Path | None = None
    problems: list[str] = field(default_factory=list)  # what --skip-bad skipped, one line each
    # a mix of several datasets (rsitr.data.mixed): each part's sampling weight, in part order;
    # None = proportional to its size. Empty for a single dataset.
    part_weights: dict[str, float | None] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------------------
    def split(self, name: str) -> "CaptionDataset":
        """The entries of split ``name``; ``"train+val"`` joins splits (in entry order), ``"none"``
        (or ``""``) is an empty split (e.g. ``data.val_split: none``: no validation).

        ``"SPLIT:distinct>=N"`` keeps the images of SPLIT with at least N distinct captions (compared
        case-folded, spaces and end punctuation ignored). RSICD's test split was drawn that way (1,091
        of its 1,093 images have >= 2 distinct captions; half of train's and val's images repeat one
        sentence five times), so ``val:distinct>=2`` is a validation subset drawn like test
        (docs/results.md, "A selection rule that tracks test")."""
        name, _, filt = name.partition(":")
        names = {n.strip() for n in name.split("+")} - {"", "none"}
        keep = [e for e in self.entries if e.split in names]
        if filt.strip():
            least = parse_distinct_filter(filt)
            keep = [e for e in keep if distinct_captions(e.captions) >= least]
        return CaptionDataset(keep, self.format, self.source, part_weights=dict(self.part_weights))

    def parts(self) -> list[tuple[str, int, int]]:
        """``[(name, start, stop)]``: the contiguous entry ranges of a mix's parts, in order
        (``[]`` for a single dataset). Every part is listed, an empty one as ``start == stop``."""
        if not self.part_weights:
            return []
        names = list(self.part_weights)
        out, i = [], 0
        for name in names:
            start = i
            while i < len(self.entries) and self.entries[i].part == name:
                i += 1
            out.append((name, start, i))
        if i != len(self.entries):
            raise ValueError(f"the entries of a mixed dataset are not grouped by part in the order {names}")
        return out

    def subset(self, start: int, stop: int) -> "CaptionDataset":
        """Entries ``start:stop`` as a dataset of their own (one part of a mix: no part weights)."""
        return CaptionDataset(self.entries[start:stop], self.format, self.source)

    @property
    def splits(self) -> dict[str, int]:
        return dict(Counter(e.split for e in self.entries))

    @property
    def classes(self) -> list[str] | None:
        """Sorted scene classes of the labelled images, or None when no image has a label (no
        classification task). Images without a label (RSICD's 921 numbered ones) get class -1 in
        :meth:`label_indices`: a loss that uses labels skips them, nothing guesses their class."""
        found = {e.label for e in self.entries if e.label is not None}
        return sorted(found) if found else None

    def label_indices(self, classes: list[str] | None = None) -> list[int] | None:
        """Per image, its index in ``classes`` (default :attr:`classes`), -1 when it has no label or
        its label is not in ``classes``; None when there are no classes."""
        classes = self.classes if classes is None else classes
        if not classes:
            return None
        index = {c: i for i, c in enumerate(classes)}
        return [index.get(e.label, -1) if e.label is not None else -1 for e in self.entries]

    def texts(self) -> tuple[list[str], list[int]]:
        """All captions flattened in order, and for each its image index (the protocol's
        ``text_to_image``)."""
        texts: list[str] = []
        owner: list[int] = []
        for i, e in enumerate(self.entries):
            texts.extend(e.captions)
            owner.extend([i] * len(e.captions))
        return texts, owner

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def n_captions(self) -> int:
        return sum(len(e.captions) for e in self.entries)


@dataclass
class Features:
    """Pooled and token-level features of one modality.

    pooled: [B, D] projected, not normalised.
    tokens: [B, N, D] token features in the same space (patch/spatial or word tokens),
            excluding the pooled/CLS token.
    mask:   [B, N] bool, True where a token is real (always all-True for images).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
