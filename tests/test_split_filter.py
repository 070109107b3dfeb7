"""Split filters: ``SPLIT:distinct>=N`` keeps the images with at least N distinct captions (the way
RSICD's test split was drawn), in the data layer, the train config and ``rsitr eval``."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from rsitr.data.types import CaptionDataset, ImageEntry, distinct_captions
from rsitr.train.config import TrainConfig
from rsitr.utils.errors import RsitrError


def _ds(caps: list[list[str]], split: str = "val") -> CaptionDataset:
    return CaptionDataset([ImageEntry(f"{i}.jpg", Path(f"{i}.jpg"), split, c) for i, c in enumerate(caps)])


def test_distinct_ignores_case_spacing_and_end_punctuation():
    assert distinct_captions(["A plane .", "a  plane", "A PLANE!", "a plane."]) == 1
    assert distinct_captions(["a plane", "two planes"]) == 2


def test_filter_keeps_images_with_enough_distinct_captions():
    ds = _ds([["a", "a", "a"], ["a", "b"], ["a", "b", "c"]])
    ds.entries.append(ImageEntry("t.jpg", Path("t.jpg"), "test", ["x", "y"]))
    assert [e.image_id for e in ds.split("val:distinct>=2").entries] == ["1.jpg", "2.jpg"]
    assert [e.image_id for e in ds.split("val:distinct>=3").entries] == ["2.jpg"]
    assert len(ds.split("val")) == 3  # no filter: unchanged
    assert [e.image_id for e in ds.split("val+test:distinct>=2").entries] == ["1.jpg", "2.jpg", "t.jpg"]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=20).filter(lambda t: t.strip() and not __import__("re").fullmatch(r"\s*distinct\s*>=\s*0*[1-9]\d*\s*", t)))
def test_bad_filters_are_one_clear_error(filt):
    with pytest.raises(RsitrError, match="distinct>=N"):
        _ds([["a"]]).split("val:" + filt)
    with pytest.raises(RsitrError, match="distinct>=N"):
        TrainConfig.from_dict({"data": {"val_split": "val:" + filt}})


def test_eval_cli_takes_a_filtered_split(tmp_path):
    import json
    import subprocess
    import sys

    ann = {"images": [{"filename": f"{i}.png", "split": "val", "sentences": [{"raw": s} for s in caps]}
                      for i, caps in enumerate([["same"] * 5, ["one", "two", "one", "one", "one"]])]}
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    (tmp_path / "dataset.json").write_text(json.dumps(ann))
    out = subprocess.run([sys.executable, "-m", "rsitr.cli", "--threads", "1", "eval", "--data", str(tmp_path),
                          "--split", "val:distinct>=2", "--checkpoint", "clip:tiny", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "evaluated 1 images / 5 captions" in out.stderr  # image 0 (one sentence x5) left out
    bad = subprocess.run([sys.executable, "-m", "rsitr.cli", "eval", "--data", str(tmp_path), "--split", "val:fancy",
                          "--checkpoint", "clip:tiny"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "distinct>=N" in bad.stderr
