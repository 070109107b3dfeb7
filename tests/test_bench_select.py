"""``rsitr bench select``: selection rules (held-out split specs) scored against the test split over
a run's per-epoch checkpoints."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from pathlib import Path

from rsitr.bench.select import Candidate, candidate_labels, pairs_agree, parse_group, spearman, summarise
from rsitr.utils.errors import RsitrError


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their mean rank: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4)
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [2, 1]))


def _cand(group, label, val, val2, test):
    m = lambda x: {"mR": x}  # noqa: E731
    return Candidate(group, label, {"val": m(val), "val2": m(val2), "test": m(test),
                                    "val+qb": m(val + 1), "val2+qb": m(val2 + 1), "test+qb": m(test + 1)})


def test_summarise_picks_by_rule_and_compares_with_the_oracle():
    cands = [_cand("a", "ep1", 30, 20, 20), _cand("a", "ep2", 32, 21, 21), _cand("a", "ep3", 31, 23, 23),
             _cand("b", "ep1", 29, 22, 22), _cand("b", "ep2", 31, 20, 20), _cand("b", "ep3", 30, 21, 21)]
    res = summarise(cands, ["val", "val2"])
    rows = {r["rule"]: r for r in res["variants"]["plain"]["rows"]}
    assert rows["val"]["picks"]["a"]["picked"] == "ep2" and rows["val"]["picks"]["a"]["test_mR"] == 21
    assert rows["val2"]["picks"]["a"]["picked"] == "ep3" == rows["val2"]["picks"]["a"]["oracle"]
    assert rows["val2"]["spearman_mean"] == pytest.approx(1.0)  # val2 tracks test exactly here
    assert rows["val"]["spearman_mean"] < 0.6
    assert rows["val"]["rule_minus_test_mean"] == pytest.approx((10 + 11 + 8 + 7 + 11 + 9) / 6)
    assert res["variants"]["plain"]["oracle_test_mR_mean"] == pytest.approx((23 + 22) / 2)
    # between groups: a's mean (val 31, test 21.33) above b's (30, 21) for both rules and test
    assert rows["val"]["pairs_agree"] == 1.0 and rows["val"]["group_means"]["a"]["rule_mR"] == pytest.approx(31)
    assert rows["val"]["spearman_groups"] != rows["val"]["spearman_groups"]  # NaN: two groups


def test_between_recipes_spearman_and_pair_order():
    """Three recipes with two seeds each: val orders b above c, test the reverse."""
    cands = [_cand("a", "s0", 30, 25, 20), _cand("a", "s1", 31, 25, 21), _cand("b", "s0", 29, 24, 18), _cand("b", "s1", 29, 24, 18.5),
             _cand("c", "s0", 28, 24.5, 19), _cand("c", "s1", 28, 24.5, 19.5)]
    rows = {r["rule"]: r for r in summarise(cands, ["val", "val2"])["variants"]["plain"]["rows"]}
    assert rows["val"]["spearman_groups"] == pytest.approx(0.5) and rows["val"]["pairs_agree"] == pytest.approx(2 / 3)
    assert rows["val2"]["spearman_groups"] == pytest.approx(1.0) and rows["val2"]["pairs_agree"] == 1.0
    assert pairs_agree([1, 1, 2], [1, 2, 3]) == pytest.approx((0.5 + 1 + 1) / 3) and pairs_agree([1], [2]) != pairs_agree([1], [2])


def test_candidate_labels_tell_same_named_checkpoints_apart():
    files = [Path(f"/r/bench-s{i}/cells/d/m/seed{i}/run/checkpoint_best.pt") for i in range(3)] + [Path("/e/t3s1-ep12.pt")]
    assert candidate_labels(files) == ["seed0/run/checkpoint_best", "seed1/run/checkpoint_best", "seed2/run/checkpoint_best", "ep12"]
    assert candidate_labels([Path("/a/x/run/c.pt"), Path("/b/x/run/c.pt")]) == ["a/x/run/c", "b/x/run/c"]
    # the same epoch of two runs' copies in one folder: their stems
    assert candidate_labels([Path("/e/t3s1-ep9.pt"), Path("/e/t3s2-ep9.pt"), Path("/e/t3s2-ep6.pt")]) == ["t3s1-ep9", "t3s2-ep9", "ep6"]


def test_parse_group_errors(tmp_path):
    with pytest.raises(RsitrError, match="NAME=RUN_FOLDER:CHECKPOINT_GLOB"):
        parse_group("no-equals-sign")
    with pytest.raises(RsitrError, match="no checkpoint matches"):
        parse_group(f"a={tmp_path}:{tmp_path}/none-*.pt")
    for e in (10, 2, 1):
        (tmp_path / f"s-ep{e}.pt").write_bytes(b"")
    name, run, files = parse_group(f"a={tmp_path}:{tmp_path}/s-ep*.pt")
    assert name == "a" and [f.name for f in files] == ["s-ep1.pt", "s-ep2.pt", "s-ep10.pt"]
    assert [f.name for f in parse_group(f"a={tmp_path}:{tmp_path}/s-ep1.pt,{tmp_path}/s-ep1*.pt")[2]] == ["s-ep1.pt", "s-ep10.pt"]


def test_bench_select_cli_scores_epoch_checkpoints(synth_dataset, tmp_path):
    from rsitr.cli import main
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    data = synth_dataset(n_images=40, seed=3, image_size=64)
    run = tmp_path / "run"
    over = {"data.path": str(data), "out_dir": str(run), "model.backbone": "clip:tiny", "model.mode": "full",
            "epochs": 1, "batch_size": 8, "eval_batch_size": 16, "seed": 0}
    train(TrainConfig().override(over), progress=False)
    shutil.copy(run / "checkpoint_last.pt", tmp_path / "x-ep1.pt")
    train(TrainConfig().override({**over, "epochs": 2}), resume=True, progress=False)
    shutil.copy(run / "checkpoint_last.pt", tmp_path / "x-ep2.pt")
    rc = main(["-q", "bench", "select", "--group", f"s0={run}:{tmp_path}/x-ep*.pt", "--data", str(data),
               "--rules", "val", "val:distinct>=2", "--out", str(tmp_path / "sel")])
    assert main(["-q", "bench", "select", "--group", f"s0={run}:{tmp_path}/x-ep*.pt", "--data", str(data),
                 "--no-qbnorm", "--out", str(tmp_path / "sel-plain")]) == 0
    plain = json.loads((tmp_path / "sel-plain" / "select.json").read_text())
    assert list(plain["variants"]) == ["plain"] and set(plain["candidates"][0]["mR"]) == {"val", "val:distinct>=2", "test"}
    assert rc == 0
    res = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert [c["label"] for c in res["candidates"]] == ["ep1", "ep2"]
    assert set(res["candidates"][0]["mR"]) == {"val", "val+qb", "val:distinct>=2", "val:distinct>=2+qb", "test", "test+qb"}
    assert res["candidates"][0]["mR"]["test"] != res["candidates"][1]["mR"]["test"]  # two different checkpoints
    assert "Spearman" in (tmp_path / "sel" / "select.md").read_text()


def test_summarise_without_qbnorm_has_the_plain_variant_only():
    cands = [Candidate("a", f"ep{i}", {"val": {"mR": v}, "test": {"mR": t}}) for i, (v, t) in enumerate([(1, 2), (2, 3), (3, 1)])]
    res = summarise(cands, ["val"])
    assert list(res["variants"]) == ["plain"] and res["variants"]["plain"]["rows"][0]["picks"]["a"]["picked"] == "ep2"


def test_select_reads_each_trunk_cache_once_for_all_checkpoints(synth_dataset, tmp_path, monkeypatch):
    """Checkpoints of one trunk share its cached activations: ``score_candidates`` builds (reads) the
    trunk cache of each split once, not once per checkpoint, and scores as if it had not shared."""
    import dataclasses

    import torch

    from _tiny_backbone import TinyBackbone
    from rsitr.bench.select import score_candidates
    from rsitr.models import registry, trunk_cache
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    def build_fixed(name, device, **_):  # a pretrained trunk: the same weights in every build
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = TinyBackbone()
        model.info = dataclasses.replace(model.info, kind="selecttest", name=name)
        return model.to(device)

    registry.list_backbones()
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.register_backbone("selecttest", names=lambda: ("mini",))(build_fixed)
    data = synth_dataset(n_images=24, seed=5, image_size=32)
    run = tmp_path / "run"
    over = {"data.path": str(data), "out_dir": str(run), "model.backbone": "selecttest:mini", "model.mode": "heads",
            "epochs": 1, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "warmup_steps": 0, "cache_dir": str(tmp_path / "cache")}
    train(TrainConfig().override(over), progress=False, evaluate_test=False)
    shutil.copy(run / "checkpoint_last.pt", tmp_path / "x-ep1.pt")
    train(TrainConfig().override({**over, "epochs": 2}), resume=True, progress=False, evaluate_test=False)
    shutil.copy(run / "checkpoint_last.pt", tmp_path / "x-ep2.pt")

    calls = []
    real = trunk_cache.build_trunk_cache
    monkeypatch.setattr(trunk_cache, "build_trunk_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    groups = {"s0": (run, [tmp_path / "x-ep1.pt", tmp_path / "x-ep2.pt"])}
    shared = score_candidates(groups, data=str(data), rules=["val"], beta=14.0)
    assert len(calls) == 3  # val (and the rule "val", the same images), test, the bank: once each for both checkpoints

    alone = [score_candidates({"s0": (run, [ck])}, data=str(data), rules=["val"], beta=14.0)[0] for ck in groups["s0"][1]]
    assert len(calls) == 3 + 6  # without sharing across checkpoints: each of the three once per checkpoint
    for a, b in zip(shared, alone):
        assert a.scores == b.scores
