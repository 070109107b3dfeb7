"""RDB: VEA (differential attention), TSA (hierarchical attention), DTCL, EMA teacher,
installation protocol, checkpoint round trip and frozen-backbone training."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from rsitr.losses.contrastive import info_nce
from rsitr.methods.adapters import (
    DiffAttnAdapter,
    HierAttnAdapter,
    differential_attention,
    frozen_copy,
    lambda_init_for_depth,
)
from rsitr.methods.rdb import (
    RDB,
    classification_loss,
    consistency_kl,
    fixed_weighting,
    resolve_layers,
    uncertainty_weighting,
)
from rsitr.models.base import Backbone, BackboneInfo
from rsitr.utils.errors import RsitrError

from _fake_towers import FakeTowers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_clip():
    from rsitr.models.clip import CLIP

    return CLIP.from_config("tiny")


def batch_for(bb, n=4, labels=True):
    px = torch.randn(n, 3, 64, 64)
    ids = bb.tokenize(["a red house by the road", "two ships near a harbour", "dense forest", "a long runway"][:n])
    b = {"pixels": px, "ids": ids, "image_index": torch.arange(n), "text_index": torch.arange(n), "epoch": 0}
    if labels:
        b["labels"] = torch.tensor([0, 1, 2, 0][:n])
    return b


def run_loss(m, bb, b):
    img, txt = bb.image_features(b["pixels"]), bb.text_features(b["ids"])
    return m.loss(bb, img, txt, b)


# -- VEA ---------------------------------------------------------------------------------------
def test_lambda_init_and_reparameterisation():
    assert lambda_init_for_depth(1) == pytest.approx(0.2)
    assert lambda_init_for_depth(2) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_for_depth(40) == pytest.approx(0.8, abs=1e-4)
    a = DiffAttnAdapter(16, bottleneck=8, heads=2, depth=3)
    for p in (a.lambda_q1, a.lambda_k1, a.lambda_q2, a.lambda_k2):
        nn.init.zeros_(p)
    assert float(a.lam().detach()) == pytest.approx(lambda_init_for_depth(3))  # exp(0) - exp(0) + init
    with torch.no_grad():
        a.lambda_q1.fill_(0.5)
        a.lambda_k1.fill_(1.0)  # q1.k1 = 0.5 * head_dim(2) = 1
    assert float(a.lam().detach()) == pytest.approx(math.e - 1 + lambda_init_for_depth(3))
    with pytest.raises(RsitrError, match="multiple"):
        DiffAttnAdapter(16, bottleneck=6, heads=2)


def test_differential_attention_hand_case():
    # one head, two tokens, d = 1: scores are q * k
    q1 = torch.tensor([[[[1.0], [0.0]]]])
    k1 = torch.tensor([[[[1.0], [-1.0]]]])
    q2 = torch.tensor([[[[0.0], [2.0]]]])
    k2 = torch.tensor([[[[1.0], [0.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    lam = 0.5
    a1 = torch.softmax(torch.tensor([[1.0, -1.0], [0.0, 0.0]]), dim=-1)
    a2 = torch.softmax(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), dim=-1)
    out = differential_attention(q1, k1, q2, k2, v, lam)
    assert torch.allclose(out[0, 0], a1 - lam * a2, atol=1e-6)
    # a masked key gets no weight in either map
    masked = differential_attention(q1, k1, q2, k2, v, lam, key_mask=torch.tensor([[True, False]]))
    assert torch.allclose(masked[0, 0], torch.tensor([[1 - lam, 0.0], [1 - lam, 0.0]]), atol=1e-6)


def test_vea_is_identity_at_init():
    a = DiffAttnAdapter(24, bottleneck=8, heads=2, depth=5)
    x = torch.randn(2, 7, 24)
    assert torch.equal(a(x, None), x)


def test_vea_reduces_to_bottleneck_when_the_two_maps_coincide():
    a = DiffAttnAdapter(24, bottleneck=16, heads=2, depth=4)
    h, d = a.heads, a.head_dim
    with torch.no_grad():
        nn.init.normal_(a.up.weight)
        nn.init.normal_(a.up.bias)
        for proj in (a.q_proj, a.k_proj):
            w = proj.weight.view(h, 2, d, -1)
            w[:, 1] = w[:, 0]  # Q2 = Q1, K2 = K1 -> A2 = A1
        # lambda = exp(lq1.lk1) - exp(0) + lambda_init = 1
        nn.init.zeros_(a.lambda_q2)
        nn.init.zeros_(a.lambda_k2)
        c = math.log(2 - a.lambda_init)
        a.lambda_q1.fill_(math.sqrt(c / d))
        a.lambda_k1.fill_(math.sqrt(c / d))
    assert float(a.lam().detach()) == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(3, 5, 24)
    expected = x + a.up(F.gelu(a.down(a.norm(x))))  # classic bottleneck adapter
    assert torch.allclose(a(x, None), expected, atol=1e-5)
    # and a generic lambda does change the output (the attention path is live)
    with torch.no_grad():
        a.lambda_q1.zero_()
    assert not torch.allclose(a(x, None), expected, atol=1e-4)


def test_vea_masks_padding():
    a = DiffAttnAdapter(12, bottleneck=8, heads=2)
    nn.init.normal_(a.up.weight)
    x = torch.randn(1, 5, 12)
    valid = torch.tensor([[True, True, True, False, False]])
    y = a(x, valid)
    assert torch.equal(y[:, 3:], x[:, 3:])  # padding untouched
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 2, 12) * 10  # what padding holds does not matter
    assert torch.allclose(a(x2, valid)[:, :3], y[:, :3], atol=1e-6)


# -- TSA ---------------------------------------------------------------------------------------
def test_tsa_weights_sum_to_one_and_are_masked_on_padding():
    a = HierAttnAdapter(10, bottleneck=6, window=3, ctx_std=1.0)
    z = torch.randn(2, 8, 6)
    valid = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    w, sentence, phrases = a.hierarchy(z, valid)
    assert torch.allclose(w.sum(-1), torch.ones(2), atol=1e-6)
    assert torch.all(w[1, 4:] == 0) and torch.all(w[1, :4] > 0)
    assert torch.all(phrases[1, 2] == 0)  # third window (positions 6-7) is all padding
    assert torch.allclose(sentence, (w[..., None] * z).sum(1), atol=1e-6)
    # zero context vectors: uniform attention -> 1/N per token for full windows
    u = HierAttnAdapter(10, bottleneck=6, window=2, ctx_std=0.0)
    w, _, _ = u.hierarchy(torch.randn(1, 6, 6), torch.ones(1, 6, dtype=torch.bool))
    assert torch.allclose(w, torch.full((1, 6), 1 / 6), atol=1e-6)


def test_tsa_matches_hand_hierarchical_attention():
    a = HierAttnAdapter(4, bottleneck=3, window=2, ctx_std=1.0)
    z = torch.randn(1, 3, 3)
    valid = torch.ones(1, 3, dtype=torch.bool)
    w, sentence, _ = a.hierarchy(z, valid)
    with torch.no_grad():
        s = torch.tanh(a.word_proj(z[0])) @ a.word_ctx
        a01 = torch.softmax(s[:2], 0)  # phrase 0: tokens 0, 1
        p0, p1 = (a01[:, None] * z[0, :2]).sum(0), z[0, 2]  # phrase 1: token 2 alone (weight 1)
        b = torch.softmax(torch.stack([torch.tanh(a.phrase_proj(p)) @ a.phrase_ctx for p in (p0, p1)]), 0)
    assert torch.allclose(w[0], torch.stack([b[0] * a01[0], b[0] * a01[1], b[1]]), atol=1e-6)
    assert torch.allclose(sentence[0], b[0] * p0 + b[1] * p1, atol=1e-6)


def _tsa_by_loops(a: HierAttnAdapter, z: torch.Tensor, valid: torch.Tensor):
    """TSA's token weights and sentence vector computed phrase by phrase with Python loops over
    consecutive windows (the module doc's equations, read directly)."""
    b, n, _ = z.shape
    k = a.window if 0 < a.window < n else n
    w, sent = torch.zeros(b, n), torch.zeros(b, z.shape[2])
    with torch.no_grad():
        for i in range(b):
            phrases, tokens = [], []
            for start in range(0, n, k):
                idx = [j for j in range(start, min(start + k, n)) if valid[i, j]]
                if not idx:
                    continue
                at = torch.softmax(torch.stack([torch.tanh(a.word_proj(z[i, j])) @ a.word_ctx for j in idx]), 0)
                phrases.append((at[:, None] * z[i, idx]).sum(0))
                tokens.append((idx, at))
            if not phrases:
                continue
            bp = torch.softmax(torch.stack([torch.tanh(a.phrase_proj(p)) @ a.phrase_ctx for p in phrases]), 0)
            for bj, p, (idx, at) in zip(bp, phrases, tokens):
                w[i, idx] = bj * at
                sent[i] += bj * p
    return w, sent


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 13), batch=st.integers(1, 3), window=st.integers(-1, 15), seed=st.integers(0, 2**16),
       data=st.data())
def test_tsa_equals_the_phrase_by_phrase_equations_for_every_length_window_and_mask(n, batch, window, seed, data):
    """Any text length, window (<= 0: one phrase; >= the length: one phrase) and mask of valid
    tokens (padding anywhere, whole phrases of padding, a text of padding only): the adapter's
    weights and sentence vector are the loop reference's."""
    g = torch.Generator().manual_seed(seed)
    a = HierAttnAdapter(6, bottleneck=5, window=window, ctx_std=1.0)
    z = torch.randn(batch, n, 5, generator=g)
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=batch, max_size=batch)))
    w, sentence, a_phr = a.hierarchy(z, valid)
    w_ref, s_ref = _tsa_by_loops(a, z, valid)
    assert torch.allclose(w, w_ref, atol=1e-5) and torch.allclose(sentence, s_ref, atol=1e-5)
    has = valid.any(-1)
    assert torch.allclose(w.sum(-1)[has], torch.ones(int(has.sum())), atol=1e-5) and torch.all(w[~valid] == 0)
    assert torch.allclose(a_phr.sum(-1)[has], torch.ones(int(has.sum())), atol=1e-5)


def test_tsa_traced_graph_takes_every_text_length(tmp_path):
    """Traced once at one length (as the ONNX export of a text model is), the TSA gives torch's
    answer at every other length: no shape is taken from the traced text (an RDB model's ONNX text
    graph used to fail on other lengths, "Attempting to broadcast an axis", and ran in torch)."""
    ort = pytest.importorskip("onnxruntime")
    a = HierAttnAdapter(12, bottleneck=8, window=4, ctx_std=1.0).eval()
    nn.init.normal_(a.up.weight, std=0.1)
    x = torch.randn(2, 20, 12)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 13:] = False
    path = tmp_path / "tsa.onnx"
    with torch.no_grad():
        torch.onnx.export(a, (x, valid), str(path), input_names=["x", "valid"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "b", 1: "n"}, "valid": {0: "b", 1: "n"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, n in ((2, 20), (1, 23), (3, 1), (2, 4), (4, 9), (1, 37)):
        x = torch.randn(b, n, 12)
        valid = torch.rand(b, n) < 0.8
        (y,) = sess.run(None, {"x": x.numpy(), "valid": valid.numpy()})
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(y), a(x, valid), atol=1e-5), (b, n)


def test_tsa_identity_at_init_and_padding_unchanged():
    a = HierAttnAdapter(10, bottleneck=4, window=2)
    x = torch.randn(2, 6, 10)
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    assert torch.equal(a(x, valid), x)
    nn.init.normal_(a.up.weight)
    y = a(x, valid)
    assert torch.equal(y[1, 3:], x[1, 3:]) and not torch.allclose(y[0], x[0])


def test_adapters_are_asymmetric():
    bb = tiny_clip()
    m = RDB(bb, {}, None)
    m.install(bb)
    assert type(m.vea[0]) is not type(m.tsa[0])
    assert sum(p.numel() for p in m.vea[0].parameters()) > sum(p.numel() for p in m.tsa[0].parameters())


# -- DTCL pieces -------------------------------------------------------------------------------
def test_consistency_kl_hand_case():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]])

    def kl_rows(sl, tl):
        ps, pt = torch.softmax(sl, 1), torch.softmax(tl, 1)
        return (pt * (pt.log() - ps.log())).sum(1).mean()

    expected = 0.5 * (kl_rows(s, t) + kl_rows(s.t(), t.t()))
    assert float(consistency_kl(s, t)) == pytest.approx(float(expected), rel=1e-6)
    assert float(consistency_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    s.requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    consistency_kl(s, tt).backward()
    assert tt.grad is None and s.grad is not None  # the teacher is a constant target


def test_uncertainty_and_fixed_weighting_hand_case():
    losses = {"contrastive": torch.tensor(2.0), "cls": torch.tensor(0.5)}
    log_vars = {"contrastive": torch.tensor(0.0), "cls": torch.tensor(math.log(2.0))}
    total, w = uncertainty_weighting(losses, log_vars)
    assert float(total) == pytest.approx(2.0 + 0.5 / 2 + math.log(2.0))
    assert w == pytest.approx({"contrastive": 1.0, "cls": 0.5})
    total, _ = fixed_weighting(losses, {"contrastive": 1.0, "cls": 0.5, "consistency": 9.0})
    assert float(total) == pytest.approx(2.25)


def test_classification_loss_hand_case():
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    pooled = torch.tensor([[3.0, 0.0], [0.0, 5.0]])  # normalised: e0, e1
    labels = torch.tensor([0, 0])
    ce = 0.5 * (-math.log(math.e / (math.e + 1)) - math.log(1 / (1 + math.e)))
    assert float(classification_loss(head, [pooled], labels).detach()) == pytest.approx(ce, rel=1e-6)
    assert float(classification_loss(head, [pooled, pooled], torch.tensor([0, -1])).detach()) == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    assert float(classification_loss(head, [pooled], torch.tensor([-1, -1]))) == 0.0


# -- the method --------------------------------------------------------------------------------
def test_dtcl_terms_and_flags():
    bb = tiny_clip()
    b = batch_for(bb)
    m = RDB(bb, {"classes": ["a", "b", "c"]}, None)
    m.install(bb)
    loss, logs = run_loss(m, bb, b)
    assert {"contrastive", "cls", "consistency"} <= set(logs)
    assert logs["consistency"] == pytest.approx(0.0, abs=1e-6)  # teacher == student at init
    # uncertainty weighting starts at s = 0: plain sum
    assert logs["loss"] == pytest.approx(logs["contrastive"] + logs["cls"] + logs["consistency"], rel=1e-5)

    off = RDB(bb, {"classes": ["a", "b", "c"], "loss_cls": False, "loss_consistency": False, "weighting": "fixed"}, None)
    off.install(bb)
    assert off.cls_head is None and off.vea_teacher is None and off.log_vars is None
    img, txt = bb.image_features(b["pixels"]), bb.text_features(b["ids"])
    loss, logs = off.loss(bb, img, txt, b)
    assert set(logs) == {"loss", "contrastive", "w_contrastive"}
    assert float(loss.detach()) == pytest.approx(float(info_nce(img.pooled, txt.pooled, bb.logit_scale).detach()), rel=1e-6)

    only_cls = RDB(bb, {"classes": ["a", "b", "c"], "loss_contrastive": False, "loss_consistency": False, "weighting": "fixed", "weight_cls": 2.0}, None)
    only_cls.install(bb)
    loss, logs = run_loss(only_cls, bb, b)
    assert set(logs) == {"loss", "cls", "w_cls"} and logs["loss"] == pytest.approx(2.0 * logs["cls"], rel=1e-6)
    with pytest.raises(RsitrError, match="every DTCL term is off"):
        RDB(bb, {"loss_contrastive": False, "loss_cls": False, "loss_consistency": False}, None)
    with pytest.raises(RsitrError, match="unknown RDB option"):
        RDB(bb, {"vea_bottlenek": 8}, None)
    with pytest.raises(RsitrError, match="weighting"):
        RDB(bb, {"weighting": "magic"}, None)


def test_no_classes_turns_classification_off_with_a_log_line(caplog):
    class NoLabels:
        classes = None

        def __len__(self):
            return 4

        def texts(self):
            return ["x"] * 4, [0, 1, 2, 3]

    bb = tiny_clip()
    with caplog.at_level(logging.INFO, logger="rsitr.methods.rdb"):
        m = RDB(bb, {}, NoLabels())
    assert m.options["classes"] is None and "cls" not in m.terms and m.cls_head is None
    assert any("no scene classes" in r.message for r in caplog.records)
    m.install(bb)
    _, logs = run_loss(m, bb, batch_for(bb, labels=False))
    assert "cls" not in logs


def test_ema_teacher_update_and_teacher_forward():
    bb = tiny_clip()
    m = RDB(bb, {"classes": ["a", "b", "c"], "ema_momentum": 0.9}, None)
    m.install(bb)
    b = batch_for(bb)
    plain_img = bb.encode_image(b["pixels"]).detach()  # adapters are identity at init
    t0 = m.vea_teacher[0].up.weight.clone()
    with torch.no_grad():
        for a in list(m.vea) + list(m.tsa):
            nn.init.normal_(a.up.weight, std=0.05)
    # the teacher forward swaps the (still identity) teacher adapters in, then puts the students back
    img, txt = bb.image_features(b["pixels"]), bb.text_features(b["ids"])
    t_img, _ = m._teacher_embeddings(bb, img, txt, b)
    assert torch.allclose(t_img, plain_img, atol=1e-5) and not torch.allclose(img.pooled, plain_img, atol=1e-3)
    assert bb.visual.transformer.resblocks[0].adapter is m.vea[0]
    _, logs = m.loss(bb, img, txt, b)
    assert logs["consistency"] > 0
    m.after_step(1)
    assert torch.allclose(m.vea_teacher[0].up.weight, 0.9 * t0 + 0.1 * m.vea[0].up.weight, atol=1e-7)
    # the teacher is state (checkpointed), never a parameter
    assert not any(n.startswith(("vea_teacher", "tsa_teacher")) for n, _ in m.named_parameters())
    assert any(k.startswith("vea_teacher.") for k in m.state_dict())
    copy = frozen_copy(m.vea[0])
    x = torch.randn(1, 3, 128)
    assert len(list(copy.parameters())) == 0 and torch.allclose(copy(x, None), m.vea[0](x, None))


def test_bank_teacher_is_cheap_and_consistent():
    class Data:
        classes = ["a", "b", "c"]

        def __len__(self):
            return 4

        def texts(self):
            return ["x"] * 4, [0, 1, 2, 3]

    bb = tiny_clip()
    m = RDB(bb, {"teacher": "bank", "bank_momentum": 0.5}, Data())
    m.install(bb)
    assert m.vea_teacher is None and m.bank_image.shape == (4, bb.embed_dim)
    b = batch_for(bb)
    _, logs = run_loss(m, bb, b)
    assert logs["consistency"] == pytest.approx(0.0, abs=1e-6) and bool(m.bank_image_seen.all())
    assert "bank_image" not in m.state_dict()


def test_layer_specs():
    assert resolve_layers("all", 4, "x") == [0, 1, 2, 3]
    assert resolve_layers("last_half", 5, "x") == [2, 3, 4]
    assert resolve_layers([-1, 0, -1], 4, "x") == [0, 3]
    assert resolve_layers("none", 4, "x") == [] and resolve_layers([], 4, "x") == []
    with pytest.raises(RsitrError, match="does not exist"):
        resolve_layers([4], 4, "x")
    bb = tiny_clip()
    m = RDB(bb, {"vea_layers": [-1], "tsa_layers": "none", "loss_consistency": False}, None)
    m.install(bb)
    blocks = bb.visual.transformer.resblocks
    assert [blk.adapter is not None for blk in blocks] == [False, False, False, True]
    assert blocks[3].adapter.lambda_init == pytest.approx(lambda_init_for_depth(4))
    assert all(blk.adapter is None for blk in bb.transformer.resblocks) and len(m.tsa) == 0


# -- the slot protocol on a two-tower-like backbone ---------------------------------------------
def test_install_through_the_backbone_protocol(caplog):
    bb = FakeTowers()
    m = RDB(bb, {"tsa_layers": [-1], "classes": ["a", "b"]}, None)
    m.install(bb)
    assert m.needs_tokens and len(m.vea) == 1 and bb.slot.adapter is m.vea[0] and m.vea[0].width == 12
    assert m.vea[0].lambda_init == pytest.approx(lambda_init_for_depth(12))
    assert [b.adapter is not None for b in bb.text_blocks] == [False, False, True] and m.tsa[0].width == 10
    m2 = RDB(bb, {"vea_layers": "none"}, None)
    m2.install(bb)
    assert bb.slot.adapter is None and not m2.needs_tokens

    class Bare(Backbone):
        def __init__(self):
            super().__init__()
            self.embed_dim = 8
            self.info = BackboneInfo(kind="x", name="bare")

    with caplog.at_level(logging.WARNING, logger="rsitr.methods.rdb"):
        m3 = RDB(Bare(), {"loss_consistency": False}, None)
    assert len(m3.vea) == len(m3.tsa) == 0 and any("no adapter slots" in r.message for r in caplog.records)


# -- checkpoints and frozen-backbone training ---------------------------------------------------
def test_adapter_tensors_are_saved_once_with_the_backbone():
    bb = tiny_clip()
    m = RDB(bb, {"classes": ["a", "b", "c"]}, None)
    m.install(bb)
    with torch.no_grad():
        nn.init.normal_(m.vea[0].up.weight)
    assert not any(k.startswith(("vea.", "tsa.")) for k in m.state_dict())
    assert "visual.transformer.resblocks.0.adapter.up.weight" in bb.state_dict()
    # rebuild from (backbone state, method state) as model_from_checkpoint does, options without classes
    bb2 = tiny_clip()
    m2 = RDB(bb2, {}, None)
    m2.install(bb2)
    bb2.load_state_dict(bb.state_dict())
    res = m2.load_state_dict(m.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert m2.cls_head is not None and "cls" in m2.terms
    assert torch.equal(m2.vea[0].up.weight, m.vea[0].up.weight)


def test_training_adapters_only_leaves_the_backbone_bit_identical(tmp_path, monkeypatch):
    from rsitr.data.synth import write_synth
    from rsitr.eval.evaluate import evaluate
    from rsitr.methods import factory
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    data = write_synth(tmp_path / "synth", n_images=40, seed=3, image_size=64)
    seen = {}
    real = factory.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen["model"] = model
        seen["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(factory, "load_model", spy)
    cfg = TrainConfig().override({
        "data.path": str(data), "out_dir": str(tmp_path / "run"), "model.backbone": "clip:tiny", "model.mode": "frozen",
        "epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "eval_batch_size": 32, "seed": 5,
        "method.name": "rdb",
    })
    result = train(cfg, progress=False)
    monkeypatch.setattr(factory, "load_model", real)
    bb = seen["model"]
    after = bb.state_dict()
    backbone_keys = [k for k in seen["init"] if ".adapter." not in k]
    assert backbone_keys and all(torch.equal(after[k], seen["init"][k]) for k in backbone_keys)
    adapter_keys = [k for k in after if ".adapter." in k and k.endswith("up.weight")]
    assert adapter_keys and any(after[k].abs().sum() > 0 for k in adapter_keys)  # the adapters did train
    # the checkpoint reloads (adapters + method state) and scores the test split the same way
    reloaded = factory.load(str(tmp_path / "run" / "checkpoint_best.pt"))
    from rsitr.data.captions import load_dataset

    test = load_dataset(str(data)).split("test")
    assert evaluate(reloaded.backbone, test, method=reloaded.method, progress=False)["mR"] == pytest.approx(result.test["mR"], abs=1e-9)


@pytest.mark.slow
def test_two_tower_backbone_gets_a_token_vea_and_text_tsas():
    from rsitr.models.registry import build_backbone

    try:
        bb = build_backbone("towers:efficientnet-lite0+minilm-l6", embed_dim=32)
    except Exception as exc:  # pragma: no cover - depends on the installed tower wheels
        pytest.skip(f"two-tower backbone not available: {exc}")
    m = RDB(bb, {"classes": ["a", "b", "c"]}, None)
    m.install(bb)
    blocks = bb.adapter_slots("text").owners
    assert m.needs_tokens and bb.adapter_slots("image").owners[0].adapter is m.vea[0]
    assert all(b.adapter is a for b, a in zip(blocks, m.tsa)) and m.tsa[0].width == bb.info.config["text_width"]
    for p in bb.parameters():
        p.requires_grad_(False)
    for p in m.parameters():
        p.requires_grad_(True)
    assert bb.trunk_trainable("text") and not bb.trunk_trainable("image")  # TSA -> text trunk runs each step
    ids = bb.tokenize(["a red house by the road", "two ships near a harbour", "dense forest"])
    with torch.no_grad():
        trunk = bb.image_trunk(torch.randn(3, 3, 64, 64))
    with torch.no_grad():
        for a in list(m.vea) + list(m.tsa):
            nn.init.normal_(a.up.weight, std=0.02)
    b = {"image_trunk": trunk, "ids": ids, "labels": torch.tensor([0, 1, 2]), "image_index": torch.arange(3), "text_index": torch.arange(3)}
    loss, logs = m.loss(bb, bb.image_head(trunk), bb.text_features(ids), b)
    loss.backward()
    assert logs["consistency"] > 0 and m.vea[0].up.weight.grad is not None and m.tsa[0].up.weight.grad is not None


# -- labels where some are missing (RSICD: 921 numbered images have no scene class) -----------------
def test_unlabelled_images_are_skipped_by_the_classification_term(tmp_path, monkeypatch):
    """A partly labelled training split keeps DTCL's classification term: the classes are those of
    the labelled images, unlabelled images reach the loss as -1 and add neither loss nor gradient."""
    from rsitr.data.captions import load_dataset
    from rsitr.data.synth import write_synth
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    ann = write_synth(tmp_path / "d", n_images=30, seed=4, image_size=64)
    csv_path = ann.parent / "labels.csv"
    rows = csv_path.read_text().splitlines()
    kept = [rows[0]] + rows[1::2]  # every other image loses its label
    csv_path.write_text("\n".join(kept) + "\n")
    ds = load_dataset(ann)
    train_ds = ds.split("train")
    labels = train_ds.label_indices()
    assert train_ds.classes and -1 in labels and any(i >= 0 for i in labels)
    assert all((i == -1) == (e.label is None) for i, e in zip(labels, train_ds.entries))

    bb = tiny_clip()
    m = RDB(bb, {}, train_ds)
    assert m.options["classes"] == train_ds.classes and "cls" in m.terms

    # the term equals the cross-entropy over the labelled rows only; unlabelled rows get no gradient
    head = nn.Linear(4, 3)
    emb = torch.randn(4, 4, requires_grad=True)
    lab = torch.tensor([0, -1, 2, -1])
    loss = classification_loss(head, [emb], lab)
    ref = F.cross_entropy(head(F.normalize(emb[[0, 2]], dim=-1)), lab[[0, 2]])
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    loss.backward()
    assert emb.grad[[1, 3]].abs().sum() == 0 and emb.grad[[0, 2]].abs().sum() > 0

    # through the loop: the batch carries -1 for the unlabelled images, the term stays on
    seen = []
    real = RDB.loss

    def spy(self, backbone, img, txt, batch):
        seen.append(batch["labels"].clone())
        out = real(self, backbone, img, txt, batch)
        assert "cls" in out[1]
        return out

    monkeypatch.setattr(RDB, "loss", spy)
    cfg = TrainConfig().override({"data.path": str(ann), "out_dir": str(tmp_path / "run"), "model.backbone": "clip:tiny",
                                  "model.mode": "frozen", "method.name": "rdb", "epochs": 1, "max_steps": 2, "batch_size": 8,
                                  "eval_every": 0, "seed": 0})
    train(cfg, progress=False, evaluate_test=False)
    got = torch.cat(seen)
    assert (got == -1).any() and (got >= 0).any()
