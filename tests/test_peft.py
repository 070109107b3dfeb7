"""PEFT baselines (bottleneck adapter, LoRA), RDB's symmetric-adapter ablation, and the RDB
comparison bench. Tiny random-init CLIP and tiny synthetic data only."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from rsitr.methods.adapters import DiffAttnAdapter, HierAttnAdapter
from rsitr.methods.peft import (
    BottleneckAdapter,
    BottleneckAdapterMethod,
    FusedQKVLoRA,
    LoRA,
    LoRALinear,
    LoRAMethod,
)
from rsitr.methods.rdb import RDB
from rsitr.utils.errors import RsitrError

from _fake_towers import FakeTowers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def synth(synth_dataset) -> Path:
    return synth_dataset(n_images=24, seed=3, image_size=32)


def tiny_clip():
    from rsitr.models.clip import CLIP

    return CLIP.from_config("tiny")


def batch_for(bb, n=4):
    px = torch.randn(n, 3, 64, 64)
    ids = bb.tokenize(["a red house by the road", "two ships near a harbour", "dense forest", "a long runway"][:n])
    return {"pixels": px, "ids": ids, "image_index": torch.arange(n), "text_index": torch.arange(n), "epoch": 0}


@torch.no_grad()
def embeddings(bb, b):
    bb.eval()
    return bb.encode_image(b["pixels"]), bb.encode_text(b["ids"])


def perturb(modules):
    """Make zero-initialised parts non-zero (as training would)."""
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                if name.endswith(("up.weight", "B")):
                    nn.init.normal_(p, std=0.05)


def trainstep(bb, method, mode="frozen"):
    from rsitr.utils.distributed import DistInfo
    from rsitr.train.loop import TrainStep, _set_trainable

    module = TrainStep(bb, method, DistInfo())
    _set_trainable(module, mode)
    return module


# -- building blocks ----------------------------------------------------------------------------
def test_bottleneck_adapter_is_identity_at_init_and_keeps_padding():
    a = BottleneckAdapter(10, bottleneck=4, scale=0.5)
    x = torch.randn(2, 5, 10)
    valid = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    assert torch.equal(a(x, valid), x) and torch.equal(a(x), x)
    nn.init.normal_(a.up.weight)
    y = a(x, valid)
    with torch.no_grad():
        expected = x + 0.5 * a.up(torch.nn.functional.gelu(a.down(a.norm(x))))
    assert torch.allclose(y[0], expected[0]) and torch.equal(y[1, 2:], x[1, 2:])
    assert isinstance(BottleneckAdapter(10, 4, layernorm=False).norm, nn.Identity)


def test_lora_delta_hand_case():
    lo = LoRA(3, 2, rank=1, alpha=4.0)
    assert lo.scaling == 4.0 and torch.equal(lo(torch.randn(5, 3)), torch.zeros(5, 2))
    with torch.no_grad():
        lo.A.copy_(torch.tensor([[1.0, 0.0, 2.0]]))
        lo.B.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.tensor([[1.0, 5.0, 1.0]])  # A x = 3
    assert torch.allclose(lo(x), torch.tensor([[12.0, -12.0]]))
    fused = FusedQKVLoRA(3, "qv", rank=2, alpha=2.0)
    assert set(fused.parts) == {"q", "v"}
    perturb([fused])
    d = fused(torch.randn(4, 3))
    assert d.shape == (4, 9) and torch.equal(d[:, 3:6], torch.zeros(4, 3)) and d[:, :3].abs().sum() > 0


# -- the adapter method ----------------------------------------------------------------------------
def test_adapter_install_symmetric_sizes_and_exact_identity():
    bb = tiny_clip()
    b = batch_for(bb)
    before = embeddings(bb, b)
    m = BottleneckAdapterMethod(bb, {"bottleneck": 16}, None)
    m.install(bb)
    assert len(m.image_adapters) == len(m.text_adapters) == 4
    assert all(blk.adapter is a for blk, a in zip(bb.visual.transformer.resblocks, m.image_adapters))
    assert all(blk.adapter is a for blk, a in zip(bb.transformer.resblocks, m.text_adapters))
    assert {a.bottleneck for a in list(m.image_adapters) + list(m.text_adapters)} == {16}
    after = embeddings(bb, b)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # zero-init: exactly the original model
    m.install(bb)  # idempotent
    assert bb.transformer.resblocks[0].adapter is m.text_adapters[0]
    last = BottleneckAdapterMethod(bb, {"layers": [-1]}, None)
    last.install(bb)  # replaces the earlier adapters
    assert [blk.adapter is not None for blk in bb.visual.transformer.resblocks] == [False, False, False, True]
    with pytest.raises(RsitrError, match="unknown adapter option"):
        BottleneckAdapterMethod(bb, {"rank": 3}, None)


def assert_only_marked_params_train(bb, marker: str) -> None:
    """After a backward pass: the parameters whose name contains ``marker`` (and only those) are
    trainable and got a gradient."""
    for name, p in bb.named_parameters():
        if marker in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_adapter_only_adapter_params_get_gradients_in_frozen_mode():
    bb = tiny_clip()
    m = BottleneckAdapterMethod(bb, {"bottleneck": 8}, None)
    m.install(bb)
    perturb(list(m.image_adapters) + list(m.text_adapters))
    module = trainstep(bb, m, "frozen")
    loss, _ = module(batch_for(bb))
    loss.backward()
    assert_only_marked_params_train(bb, ".adapter.")
    # adapters counted once (shared by method and backbone); method state holds no copy of them
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == sum(p.numel() for p in m.parameters())
    assert not any(k.startswith(("image_adapters.", "text_adapters.")) for k in m.state_dict())


def test_adapter_token_slot_on_a_cnn_like_backbone():
    bb = FakeTowers()
    m = BottleneckAdapterMethod(bb, {"bottleneck": 4}, None)
    m.install(bb)
    assert m.needs_tokens and bb.slot.adapter is m.image_adapters[0] and m.image_adapters[0].width == 12
    assert all(blk.adapter is a for blk, a in zip(bb.text_blocks, m.text_adapters)) and m.text_adapters[0].width == 10
    assert m.logit_scale is not None  # the towers have no temperature: the method brings one


# -- LoRA -----------------------------------------------------------------------------------------
def test_lora_install_rank_targets_and_exact_identity():
    bb = tiny_clip()
    b = batch_for(bb)
    before = embeddings(bb, b)
    names_before = set(bb.state_dict())
    m = LoRAMethod(bb, {"rank": 4, "alpha": 8, "targets": "qkv"}, None)
    m.install(bb)
    blocks = list(bb.visual.transformer.resblocks) + list(bb.transformer.resblocks)
    assert all(isinstance(blk.attn.lora, FusedQKVLoRA) and type(blk.attn.out_proj) is nn.Linear for blk in blocks)
    assert len(m.lora) == 8 and all(isinstance(u, FusedQKVLoRA) and set(u.parts) == {"q", "k", "v"} for u in m.lora)
    assert all(lo.A.shape == (4, 128) and lo.B.shape == (128, 4) and lo.scaling == 2.0 for u in m.lora for lo in u.parts.values())
    assert sum(p.numel() for p in m.parameters()) == 8 * 3 * (4 * 128 + 128 * 4)
    # the pretrained names are untouched; LoRA tensors are added under .lora.
    names = set(bb.state_dict())
    assert names_before <= names and all(".attn.lora.parts." in k for k in names - names_before)
    after = embeddings(bb, b)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])  # B = 0: exactly the original model

    o = LoRAMethod(bb, {"rank": 2, "targets": "qkvo", "layers": [0, -1]}, None)
    o.install(bb)  # replaces the earlier LoRA everywhere
    assert [blk.attn.lora is not None for blk in bb.transformer.resblocks] == [True, False, False, True]
    assert [type(blk.attn.out_proj) is LoRALinear for blk in bb.transformer.resblocks] == [True, False, False, True]
    assert len(o.lora) == 2 * 2 * 2 and {lo.rank for u in o.lora for lo in ([u] if isinstance(u, LoRA) else u.parts.values())} == {2}
    assert torch.equal(embeddings(bb, b)[1], before[1])
    perturb(o.lora)
    assert not torch.allclose(embeddings(bb, b)[1], before[1])
    with pytest.raises(RsitrError, match="targets"):
        LoRAMethod(bb, {"targets": "qx"}, None)
    with pytest.raises(RsitrError, match="unknown lora option"):
        LoRAMethod(bb, {"bottleneck": 3}, None)


def test_lora_attention_matches_explicit_weight_update():
    bb = tiny_clip()
    m = LoRAMethod(bb, {"rank": 2, "targets": "qv", "layers": [0]}, None)
    m.install(bb)
    perturb(m.lora)
    attn = bb.transformer.resblocks[0].attn
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        got = attn(x)
        u = attn.lora.parts
        w = attn.in_proj_weight.clone()
        w[:128] += u["q"].scaling * u["q"].B @ u["q"].A  # merged W0 + (alpha/r) B A for q and v; k unchanged
        w[256:] += u["v"].scaling * u["v"].B @ u["v"].A
        from rsitr.models.clip.model import Attention

        ref = Attention(128, attn.heads)
        ref.load_state_dict({k: v for k, v in attn.state_dict().items() if ".lora." not in k and not k.startswith("lora.")})
        ref.in_proj_weight.copy_(w)
        assert torch.allclose(got, ref(x), atol=1e-5)


def test_lora_only_lora_params_get_gradients_and_checkpoint_holds_only_them():
    from rsitr.train.loop import trainable_state

    bb = tiny_clip()
    m = LoRAMethod(bb, {"rank": 2, "targets": "qkvo"}, None)
    m.install(bb)
    perturb(m.lora)
    module = trainstep(bb, m, "frozen")
    loss, _ = module(batch_for(bb))
    loss.backward()
    assert_only_marked_params_train(bb, ".lora.")
    state = trainable_state(module, full_backbone=False)  # what a rebuildable backbone's checkpoint stores
    assert state and all(k.startswith("backbone.") and ".lora." in k for k in state)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_lora_skips_a_cnn_tower_with_a_log_line(caplog):
    from rsitr.models.towers.minilm import BertConfig, BertLayer

    class Towers(FakeTowers):
        def __init__(self):
            super().__init__()
            self.text_blocks = nn.ModuleList(BertLayer(BertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32)) for _ in range(2))

    bb = Towers()
    with caplog.at_level(logging.INFO, logger="rsitr.methods.peft"):
        m = LoRAMethod(bb, {"rank": 3, "targets": "qkvo"}, None)
    m.install(bb)
    assert any("image tower" in r.message and "no LoRA" in r.message for r in caplog.records)
    assert not m.needs_tokens and len(m.lora) == 2 * 4 and bb.slot.adapter is None
    layer = bb.text_blocks[1]
    assert all(type(lin) is LoRALinear for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                                                     layer.attention.output.dense))
    assert layer.attention.self.query.lora.A.shape == (3, 16)
    x, bias = torch.randn(2, 4, 16), torch.zeros(2, 1, 1, 4)
    layer.eval()
    ref = layer(x, bias)
    perturb(m.lora)
    assert not torch.allclose(layer(x, bias), ref)


# -- save / reload through the training loop ------------------------------------------------------
@pytest.mark.parametrize("name, options", [("lora", {"rank": 2, "targets": "qkvo"}), ("adapter", {"bottleneck": 8})])
def test_train_save_reload_reproduces_embeddings(name, options, synth, tmp_path, monkeypatch):
    from rsitr.methods import factory
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    seen = {}
    real = factory.load_model

    def spy(*args, **kwargs):
        seen["model"] = real(*args, **kwargs)
        seen["init"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
        return seen["model"]

    monkeypatch.setattr(factory, "load_model", spy)
    cfg = TrainConfig().override({
        "data.path": str(synth), "out_dir": str(tmp_path / "run"), "model.backbone": "clip:tiny", "model.mode": "frozen",
        "epochs": 1, "max_steps": 2, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 32,
        "seed": 2, "augment.enabled": False, "method.name": name, "method.options": options,
    })
    res = train(cfg, progress=False)
    monkeypatch.setattr(factory, "load_model", real)
    bb = seen["model"]  # holds the best checkpoint's state (the loop reloads it for the test split)
    after = bb.state_dict()
    mark = ".lora." if name == "lora" else ".adapter."
    frozen = [k for k in seen["init"] if mark not in k]
    assert all(torch.equal(after[k], seen["init"][k]) for k in frozen)  # the backbone did not move
    assert any(after[k].abs().sum() > 0 for k in after if mark in k and k.endswith(("B", "up.weight")))  # the PEFT part did
    assert res.trainable_params == sum(v.numel() for k, v in after.items() if mark in k)
    loaded = factory.load(str(tmp_path / "run"))
    assert loaded.trained["name"] == name and loaded.method.name == name
    reloaded = loaded.backbone
    b = batch_for(bb)
    e1, e2 = embeddings(bb, b), embeddings(reloaded, b)
    assert torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1])


# -- RDB's symmetric ablation ---------------------------------------------------------------------
def test_rdb_symmetric_builds_one_adapter_type_and_size_on_both_sides():
    bb = tiny_clip()
    m = RDB(bb, {"symmetric": True, "classes": ["a", "b", "c"]}, None)
    m.install(bb)
    every = list(m.vea) + list(m.tsa)
    assert len(m.vea) == len(m.tsa) == 4 and all(type(a) is DiffAttnAdapter for a in every)
    assert {(a.bottleneck, a.heads) for a in every} == {(64, 4)}
    assert all(blk.adapter is a for blk, a in zip(bb.transformer.resblocks, m.tsa))
    assert sum(p.numel() for p in m.vea.parameters()) == sum(p.numel() for p in m.tsa.parameters())  # same widths in tiny CLIP
    b = batch_for(bb)
    b["labels"] = torch.tensor([0, 1, 2, 0])
    perturb(every)
    img, txt = bb.image_features(b["pixels"]), bb.text_features(b["ids"])
    loss, logs = m.loss(bb, img, txt, b)
    loss.backward()
    assert m.tsa[0].up.weight.grad is not None and logs["consistency"] > 0
    t = RDB(bb, {"symmetric": "tsa", "loss_consistency": False}, None)
    t.install(bb)
    assert all(type(a) is HierAttnAdapter and a.bottleneck == 32 for a in list(t.vea) + list(t.tsa))
    asym = RDB(bb, {}, None)
    assert type(asym.vea[0]) is DiffAttnAdapter and type(asym.tsa[0]) is HierAttnAdapter  # default unchanged
    with pytest.raises(RsitrError, match="symmetric"):
        RDB(bb, {"symmetric": "both"}, None)


# -- the comparison bench (the rdb-comparison suite, run by the one runner) ----------------------
@pytest.mark.slow
def test_bench_rdb_runs_the_comparison_suite(synth, tmp_path, capsys):
    from rsitr.cli import main

    out = tmp_path / "cmp"
    args = ["-q", "bench", "rdb", "--data", str(synth), "--out", str(out), "--backbone", "clip:tiny", "--epochs", "1", "--max-steps", "2",
            "--variants", "zero-shot", "lora", "--option", "lora.rank=2", "--set", "batch_size=8", "--set", "warmup_steps=1",
            "--set", "eval_every=0", "--set", "eval_batch_size=32", "--set", "augment.enabled=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    cells = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in out.glob("cells/*/*/seed0/cell.json")}
    assert set(cells) == {"zero-shot", "lora"} and all(c["status"] == "ok" for c in cells.values())
    zs, lo = cells["zero-shot"]["measurements"]["params"], cells["lora"]["measurements"]["params"]
    assert zs["trainable_params"] == 0 and zs["steps"] == 0 and zs["added_params"] == 0 and 0 <= cells["zero-shot"]["test"]["mR"] <= 100
    assert cells["lora"]["mode"] == "frozen" and lo["steps"] == 2 and 0 <= cells["lora"]["test"]["mR"] <= 100  # clip: PEFT rows frozen
    assert lo["trainable_params"] == lo["added_params"] == 8 * 3 * 2 * (2 * 128)
    assert lo["trainable_pct"] == pytest.approx(100 * lo["trainable_params"] / lo["total_params"])
    md = (out / "report.md").read_text()
    assert md in printed and "### Parameters and budget (`params`)" in md
    assert "| zero-shot | - | 0 | 0.000 | 0 | 0 | 0 |" in md and "| lora | frozen | 12.29K |" in md
    # a second call reads the finished cells back instead of training again
    assert main(args) == 0
    assert capsys.readouterr().out.count("done (skipped)") == 2
    # a method's option needs its method
    assert main(["-q", "bench", "rdb", "--data", str(synth), "--out", str(tmp_path / "cli"), "--option", "rank=4"]) == 2
    assert "METHOD.KEY" in capsys.readouterr().err
    assert main(["-q", "bench", "rdb", "--data", str(synth), "--out", str(tmp_path / "cli"), "--variants", "rdb-nope"]) == 2
    assert "unknown method(s) ['rdb-nope']" in capsys.readouterr().err
