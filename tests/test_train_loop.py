"""The training loop: config handling, loss, schedule, exact resume, DDP equivalence, CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.losses.contrastive import info_nce
from rsitr.train.config import TrainConfig, parse_override
from rsitr.train.loop import cosine_with_warmup
from rsitr.utils.errors import RsitrError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(synth_dataset) -> Path:
    return synth_dataset(n_images=60, seed=3, image_size=64)


def tiny_cfg(data: Path, out: Path, **over) -> TrainConfig:
    base = {
        "data.path": str(data), "out_dir": str(out), "model.backbone": "clip:tiny", "model.mode": "full",
        "epochs": 2, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "eval_every": 1, "eval_batch_size": 32, "seed": 7,
    }
    base.update(over)
    return TrainConfig().override(base)


# -- config ---------------------------------------------------------------------------------
def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 3\nmodel:\n  mode: full\naugment:\n  scale: [0.3, 1.0]\n")
    cfg = TrainConfig.from_yaml(p)
    assert cfg.epochs == 3 and cfg.model.mode == "full" and cfg.augment.scale == (0.3, 1.0)
    cfg2 = cfg.override(dict([parse_override("lr=1e-4"), parse_override("model.embed_dim=128")]))
    assert cfg2.lr == pytest.approx(1e-4) and cfg2.model.embed_dim == 128 and cfg.lr != cfg2.lr
    with pytest.raises(RsitrError, match="unknown config key"):
        cfg.override({"model.nope": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\ntypo_key: 1\n")
    with pytest.raises(RsitrError, match="typo_key"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(RsitrError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


# -- loss and schedule ---------------------------------------------------------------------------
def test_info_nce_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = math.log(10.0)
    logits = 10 * img @ txt.t()  # already unit vectors
    ce_i = -(torch.log_softmax(logits, 1).diag()).mean()
    ce_t = -(torch.log_softmax(logits.t(), 1).diag()).mean()
    assert info_nce(img, txt, scale).item() == pytest.approx(float(0.5 * (ce_i + ce_t)), rel=1e-6)
    # perfectly aligned, well separated pairs give a lower loss than shuffled ones
    e = torch.eye(4)
    assert info_nce(e, e, math.log(50)) < info_nce(e, e[[1, 0, 3, 2]], math.log(50))
    # the temperature is clamped at 100
    assert info_nce(img, txt, 10.0).item() == pytest.approx(info_nce(img, txt, math.log(100.0)).item())


def test_cosine_with_warmup():
    f = cosine_with_warmup(total_steps=110, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 109))


def test_epoch_order_is_a_deterministic_permutation(synth):
    from rsitr.data.captions import load_dataset
    from rsitr.train.epochs import epoch_order

    ds = load_dataset(synth).split("train")
    a, b, c = epoch_order(ds, 0, 1), epoch_order(ds, 0, 1), epoch_order(ds, 1, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(map(tuple, a.tolist())) == sorted((i, k) for i, e in enumerate(ds.entries) for k in range(len(e.captions)))
    imgs = epoch_order(ds, 0, 1, unit="images")
    assert len(imgs) == len(ds) and sorted(imgs[:, 0].tolist()) == list(range(len(ds)))


# -- training ---------------------------------------------------------------------------------------
def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint_last.pt", weights_only=True)["state"]


class Crash(Exception):
    pass


def _crash_at(n):
    def hook(step):
        if step == n:
            raise Crash(step)

    return hook


@pytest.mark.parametrize("backbone,mode", [("clip:tiny", "full")])
def test_resume_after_crash_equals_uninterrupted(synth, tmp_path, backbone, mode):
    from rsitr.train.loop import train

    over = {"model.backbone": backbone, "model.mode": mode, "save_every_steps": 1}
    full = train(tiny_cfg(synth, tmp_path / "a", **over), progress=False)
    with pytest.raises(Crash):
        train(tiny_cfg(synth, tmp_path / "b", **over), progress=False, on_step=_crash_at(3))
    # the killed run left a consistent checkpoint; resuming finishes the job
    progress = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)["progress"]
    assert progress["global_step"] == 3
    resumed = train(tiny_cfg(synth, tmp_path / "b", **over), resume=True, progress=False)
    # the run's training time counts the crashed invocation up to its checkpoint
    assert progress["seconds"] > 0 and resumed.run_seconds == pytest.approx(progress["seconds"] + resumed.seconds)
    assert full.run_seconds == pytest.approx(full.seconds)
    assert json.loads((tmp_path / "b" / "result.json").read_text())["run_seconds"] == pytest.approx(resumed.run_seconds, abs=0.01)
    sa, sb = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert resumed.best == full.best
    assert full.test is not None and set(full.test) >= {"i2t_r1", "t2i_r10", "mR"}
    # an existing run is never overwritten without --resume
    with pytest.raises(RsitrError, match="--resume"):
        train(tiny_cfg(synth, tmp_path / "a", **over), progress=False)


def test_grad_accum_step_bookkeeping(synth, tmp_path):
    """InfoNCE depends on the batch, so accumulation cannot equal one big batch numerically;
    what must hold is the bookkeeping: 2 micro-batches of 8 make one step, like a batch of 16."""
    from rsitr.train.loop import train

    r1 = train(tiny_cfg(synth, tmp_path / "g1", batch_size=8, grad_accum=2, epochs=1, eval_every=0), progress=False, evaluate_test=False)
    r2 = train(tiny_cfg(synth, tmp_path / "g2", batch_size=16, grad_accum=1, epochs=1, eval_every=0), progress=False, evaluate_test=False)
    assert r1.history[-1]["global_step"] == r2.history[-1]["global_step"]


@pytest.mark.slow
def test_checkpoint_loads_as_model_and_evaluates_via_cli(synth, tmp_path):
    from rsitr.cli import main
    from rsitr.methods.factory import load_model
    from rsitr.train.loop import train

    run = tmp_path / "run"
    res = train(tiny_cfg(synth, run, epochs=1), progress=False)
    model = load_model(str(run))
    ids = model.tokenize(["a red car"])
    assert model.encode_text(ids).shape[-1] == model.embed_dim
    code = subprocess.run(
        [sys.executable, "-m", "rsitr.cli", "-q", "eval", "--data", str(synth), "--checkpoint", str(run), "--json"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert code.returncode == 0, code.stderr
    got = json.loads(code.stdout)
    assert got["mR"] == pytest.approx(res.test["mR"], abs=1e-6)
    # clear error, exit 2, on a checkpoint that does not exist
    assert main(["-q", "eval", "--data", str(synth), "--checkpoint", str(tmp_path / "nope.pt")]) == 2


# eps=1 makes AdamW's step proportional to the gradient (instead of ~lr*sign(g)), so a wrong
# gradient scale across ranks shows up, and float noise in near-zero gradients does not.
DDP_SCRIPT = r"""
import sys, torch
from rsitr.train.config import TrainConfig
from rsitr.train.loop import train
data, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig().override({"data.path": data, "out_dir": out, "model.backbone": "clip:tiny", "model.mode": "full",
    "epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 0.05, "eps": 1.0, "warmup_steps": 1, "eval_every": 0, "seed": 5, "augment.enabled": False,
    "method.false_negatives": "mask"})  # the masking gathers batch indices across processes too
train(cfg, progress=False, evaluate_test=False)
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(synth, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, str(script), str(synth), str(tmp_path / "single")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script), str(synth), str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    s1, s2 = _state(tmp_path / "single"), _state(tmp_path / "ddp")
    moved = 0
    init = None
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-6, rtol=1e-4), (k, float((s1[k] - s2[k]).abs().max()), int(((s1[k] - s2[k]).abs() > 2e-5).sum()), s1[k].numel())
    # and training actually changed the weights
    from rsitr.models.clip import CLIP

    torch.manual_seed(5)
    init = CLIP.from_config("tiny").state_dict()
    moved = sum(not torch.allclose(init[k], s1["backbone." + k]) for k in init)
    assert moved > 0
