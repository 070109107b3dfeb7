"""Scene labels of a loaded dataset (``labels=`` of :func:`~rsitr.data.captions.load_dataset`).

``None``/"auto": the dataset folder's ``labels.csv`` when there is one, else per image the
annotation's own label (PIR ``label_name``, NWPU class key), else the file name. "filename" and
"ucm-order" apply that rule to every image; "none" gives no labels; anything else is the path of a
labels CSV. The rules themselves live in :mod:`rsitr.data.labels`.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from rsitr.data.captions.base import LoadInfo
from rsitr.data.labels import LabelTable, label_from_filename, looks_like_ucm, ucm_order_label
from rsitr.data.types import ImageEntry
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

_NAME_RULES = {"ucm-order": ucm_order_label, "filename": label_from_filename}


def apply_labels(entries: list[ImageEntry], labels: Any, folder: Path, label_of: dict[str, str | None],
                 written_of: dict[str, str], info: LoadInfo) -> None:
    """Set ``entry.label`` of every entry and ``info.label_source``; note images left without one.
    ``label_of``: the annotation's own label per image id; ``written_of``: the path as listed."""
    mode = "auto" if labels is None else str(labels)
    if mode == "none":
        info.label_source = "none"
        return
    if mode in _NAME_RULES:
        rule = _NAME_RULES[mode]
        for e in entries:
            e.label = rule(written_of[e.image_id])
        info.label_source = mode
    else:
        csv_path = folder / "labels.csv" if mode == "auto" else Path(mode)
        if csv_path.is_file():
            table = LabelTable.from_csv(csv_path)
            for e in entries:
                e.label = table.lookup(e.image_id, written_of[e.image_id])
            info.label_source = f"csv:{csv_path}"
        elif mode == "auto":  # per image: the annotation's own label, else the file name
            used: Counter = Counter()
            for e in entries:
                e.label = label_of.get(e.image_id)
                if e.label is None:
                    e.label = label_from_filename(written_of[e.image_id])
                    used["filename"] += e.label is not None
                else:
                    used["annotation"] += 1
            info.label_source = "+".join(k for k in ("annotation", "filename") if used[k]) or "none"
        else:
            raise DataError(f"labels={mode!r}: not a file and not one of auto, filename, ucm-order, none")
    missing = [e.image_id for e in entries if e.label is None]
    if missing and len(missing) < len(entries):
        log.info("%d of %d images have no scene label (e.g. %s, source %s): label -1, skipped by losses that use labels",
                 len(missing), len(entries), missing[0], info.label_source)
        info.notes.append(f"{len(missing)} of {len(entries)} images have no scene label (e.g. {missing[0]}); they get label -1 (skipped by losses that use labels)")
    elif missing:
        hint = " (UCM-like numeric names: labels='ucm-order' applies the UCM order rule)" if looks_like_ucm(list(written_of.values())) else ""
        log.info("no scene labels found (source %s)%s", info.label_source, hint)
        info.notes.append(f"no scene labels{hint}")
