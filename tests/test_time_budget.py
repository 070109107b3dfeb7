"""time_budget bounds the whole run, trunk caching included; a run it stopped before one epoch
does not exit 0 (issue 21 defect 2)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fake_trunks

from rsitr.data.imagesets import CacheBudget
from rsitr.models.trunk_cache import build_trunk_cache
from rsitr.data.transforms import EvalTransform
from rsitr.utils.errors import RsitrError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(synth_dataset) -> Path:
    return synth_dataset(n_images=60, seed=3, image_size=32)


def test_caching_that_cannot_fit_stops_early(synth, tmp_path):
    from rsitr.data.captions import load_dataset

    ds = load_dataset(synth).split("train")  # 42 images, 210 captions: 6 + 27 batches of 8
    trunks = fake_trunks(delay=0.05)  # what the towers do on a loaded CPU
    budget = CacheBudget(time.perf_counter() + 0.5, 0.5)
    t0 = time.perf_counter()
    with pytest.raises(RsitrError, match=r"time_budget=0.5 s cannot cover caching the frozen trunks"):
        build_trunk_cache(trunks, ds, cache_dir=tmp_path, eval_transform=EvalTransform(trunks.preprocess), batch_size=8, progress=False,
                          budget=budget)
    # it refused after a few batches (33 would take ~1.7 s), long before the deadline
    assert trunks.calls <= 4 and time.perf_counter() - t0 < 0.5
    # enough budget: everything is cached, and a second run needs no budget at all (cache files reused)
    ok = build_trunk_cache(trunks, ds, cache_dir=tmp_path, eval_transform=EvalTransform(trunks.preprocess), batch_size=8, progress=False,
                           budget=CacheBudget(time.perf_counter() + 60, 60))
    assert ok.image[0].pooled.shape[0] == len(ds) and ok.text.pooled.shape[0] == ds.n_captions
    calls = trunks.calls
    build_trunk_cache(trunks, ds, cache_dir=tmp_path, eval_transform=EvalTransform(trunks.preprocess), batch_size=8, progress=False,
                      budget=CacheBudget(time.perf_counter() + 0.01, 0.01))
    assert trunks.calls == calls


def test_budget_already_spent_refuses_at_once():
    b = CacheBudget(time.perf_counter() - 1, 5)
    b.plan(10)
    with pytest.raises(RsitrError, match="stopped before training"):
        b.step()


@pytest.mark.slow
def test_train_stopped_before_an_epoch_exits_3(synth, tmp_path):
    """clip:tiny trains without a cache; a budget of a few ms stops it after its first step: the
    command says the model is not trained and exits 3 (it used to exit 0 with a near-random model)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "rsitr.cli", "-q", "train", "--data", str(synth), "--out", str(tmp_path / "run"),
                        "--backbone", "clip:tiny", "--mode", "full", "--epochs", "2", "--set", "batch_size=8", "--set", "eval_batch_size=32",
                        "--set", "time_budget=0.001"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
    assert "not trained" in p.stderr and "Traceback" not in p.stderr
    # and a run that trains at least an epoch within its budget succeeds
    from rsitr.cli import main

    code = main(["-q", "train", "--data", str(synth), "--out", str(tmp_path / "run2"), "--backbone", "clip:tiny", "--mode", "full",
                 "--epochs", "1", "--set", "batch_size=8", "--set", "eval_batch_size=32", "--set", "time_budget=600"])
    assert code == 0
