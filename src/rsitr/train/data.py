"""The training run's dataset from its ``data`` config: one dataset (``data.path``) or a mix of
several (``data.sources``, :mod:`rsitr.data.mixed`), optionally cut to ``data.subset`` images per split."""
from __future__ import annotations

from rsitr.data.types import CaptionDataset
from rsitr.utils.errors import RsitrError


def load_training_data(dcfg) -> CaptionDataset:
    from rsitr.data.captions import load_dataset
    from rsitr.data.mixed import load_mixed, parse_sources

    if dcfg.sources:
        if dcfg.path:
            raise RsitrError("give data.path or data.sources, not both")
        sources = parse_sources(dcfg.sources)

        def load(src):
            return load_dataset(src.path, format=src.format, image_root=src.image_root, labels=src.labels, skip_bad=dcfg.skip_bad)

        data = load_mixed(sources, load)
    else:
        if not dcfg.path:
            raise RsitrError("no training data: set data.path (or --data), or data.sources")
        data = load_dataset(dcfg.path, format=dcfg.format, image_root=dcfg.image_root, labels=dcfg.labels, skip_bad=dcfg.skip_bad)
    if dcfg.subset:
        # the first N images of each split (of each part of a mix)
        keep: dict[tuple, int] = {}
        entries = []
        for e in data.entries:
            k = (e.part, e.split)
            if keep.setdefault(k, dcfg.subset) > 0:
                keep[k] -= 1
                entries.append(e)
        data = CaptionDataset(entries, data.format, data.source, data.problems, part_weights=dict(data.part_weights))
    return data
