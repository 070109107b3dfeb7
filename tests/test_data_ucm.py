"""The real UCM-Captions folder (../shared/data/ucm-captions) loads as is."""
from __future__ import annotations

from collections import Counter

import pytest

from rsitr.data.captions import load_dataset
from rsitr.data.check import check_dataset, exit_code
from rsitr.data.labels import UCM_CLASSES


@pytest.fixture(scope="module")
def ucm_dir(shared_dir):
    d = shared_dir / "data" / "ucm-captions"
    if not (d / "dataset.json").is_file():
        pytest.skip(f"UCM-Captions not found at {d} (needs the project's shared data folder)")
    return d


def test_ucm_loads_as_is(ucm_dir):
    ds = load_dataset(ucm_dir, check_images=True)  # every image header is opened
    assert ds.format == "karpathy" and len(ds) == 2100 and ds.n_captions == 10500
    assert ds.splits == {"train": 1680, "val": 210, "test": 210}
    assert ds.classes == list(UCM_CLASSES)
    assert Counter(e.label for e in ds.entries) == {c: 100 for c in UCM_CLASSES}
    assert ds.problems == [] and ds.load_info.resolution["as-written"] == 2100
    assert all(e.path.is_file() for e in ds.entries)
    # labels.csv agrees with the UCM order rule
    by_order = load_dataset(ucm_dir, labels="ucm-order", check_images=False)
    assert [e.label for e in by_order.entries] == [e.label for e in ds.entries]


def test_ucm_check_every_image_readable(ucm_dir):
    r = check_dataset(ucm_dir)
    assert r["missing_images"] == 0 and r["unreadable_images"] == 0 and exit_code(r) == 0
    assert r["captions_per_image"] == {"5": 2100}
    assert r["classes"] == {c: 100 for c in UCM_CLASSES}
