"""CLIP backbone and loaders against independent references.

Checkpoints are written in each real format with random weights (open_clip state dicts as
RemoteCLIP/GeoRSCLIP ship them, open_clip training checkpoints, safetensors, OpenAI TorchScript
archives and plain state dicts, Hugging Face CLIP directories), loaded with ``rsitr.load_model``
and compared with a forward pass of open_clip / transformers on the same weights and inputs.
"""
from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch

import rsitr
from rsitr.models.clip import CLIP, CONFIGS, infer_config, load_clip
from rsitr.utils.errors import CheckpointError

ATOL = 2e-5


def _oc_tiny(open_clip, quick_gelu: bool, seed: int = 0):
    torch.manual_seed(seed)
    m = open_clip.model.CLIP(
        embed_dim=48,
        vision_cfg={"layers": 2, "width": 128, "head_width": 64, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
        quick_gelu=quick_gelu,
    ).eval()
    # make the (zero-initialised) biases and LN params non-trivial so every tensor is exercised
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim == 1 and "logit_scale" not in n:
                p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs(image_size: int, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, image_size, image_size, generator=g)
    ids = rsitr.tokenize(["a plane parked near the terminal", "two white storage tanks beside a road", "dense forest"][:n])
    return px, ids


def _assert_same(ours, ref_img, ref_txt, px, ids):
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(px), ref_img, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(ids), ref_txt, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("fmt", ["plain", "training", "safetensors"])
def test_open_clip_state_dicts(open_clip, tmp_path, fmt, quick_gelu):
    ref = _oc_tiny(open_clip, quick_gelu)
    sd = ref.state_dict()
    if fmt == "plain":  # RemoteCLIP / GeoRSCLIP releases
        path = tmp_path / "RemoteCLIP-tiny.pt"
        torch.save(sd, path)
    elif fmt == "training":  # open_clip's own checkpoints: epoch, optimizer, DDP prefix
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    ours = load_clip(path, quick_gelu=quick_gelu)
    assert ours.cfg.image_size == 32 and ours.cfg.patch_size == 8 and ours.embed_dim == 48
    px, ids = _inputs(32)
    with torch.no_grad():
        _assert_same(ours, ref.encode_image(px), ref.encode_text(ids), px, ids)


def test_activation_default_follows_format(open_clip, tmp_path):
    """open_clip state dicts default to GELU (open_clip's ViT-B-32 config); OpenAI state dicts
    (they carry input_resolution) to QuickGELU."""
    ref = _oc_tiny(open_clip, quick_gelu=False)
    torch.save(ref.state_dict(), tmp_path / "oc.pt")
    assert load_clip(tmp_path / "oc.pt").cfg.quick_gelu is False
    ref_q = _oc_tiny(open_clip, quick_gelu=True)
    sd = dict(ref_q.state_dict())
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "openai_sd.pt")
    ours = rsitr.load_model(str(tmp_path / "openai_sd.pt"))
    assert ours.cfg.quick_gelu is True
    px, ids = _inputs(32)
    with torch.no_grad():
        _assert_same(ours, ref_q.encode_image(px), ref_q.encode_text(ids), px, ids)


@pytest.mark.parametrize("half", [False, True])
def test_openai_torchscript_archive(open_clip, tmp_path, half):
    """OpenAI ships TorchScript archives (fp16 weights); they are read without running code."""
    ref = _oc_tiny(open_clip, quick_gelu=True)
    px, ids = _inputs(32)
    with torch.no_grad():
        want_img, want_txt = ref.encode_image(px), ref.encode_text(ids)

    class Wrapper(torch.nn.Module):  # traced module with OpenAI's attribute names at the root
        def __init__(self, m):
            super().__init__()
            for name in ("visual", "transformer", "token_embedding", "ln_final"):
                setattr(self, name, getattr(m, name))
            self.positional_embedding = m.positional_embedding
            self.text_projection = m.text_projection
            self.logit_scale = m.logit_scale
            self.register_buffer("input_resolution", torch.tensor(32))
            self.m = [m]

        def forward(self, image):
            return self.visual(image)

    w = Wrapper(ref)
    if half:
        w = w.half()
        want_img, want_txt = [], []
        ref_half = ref.half()
        with torch.no_grad():  # reference: the same fp16 weights upcast to fp32
            ref32 = _oc_tiny(open_clip, quick_gelu=True)
            ref32.load_state_dict({k: v.float() for k, v in ref_half.state_dict().items()})
            want_img, want_txt = ref32.encode_image(px), ref32.encode_text(ids)
    traced = torch.jit.trace(w, (px.to(next(w.parameters()).dtype),), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    assert zipfile.is_zipfile(path)
    ours = rsitr.load_model(str(path))
    assert ours.info.weights["format"] == "torchscript"
    assert ours.cfg.quick_gelu is True
    assert next(ours.parameters()).dtype == torch.float32
    _assert_same(ours, want_img, want_txt, px, ids)


def test_torchscript_reader_refuses_code(tmp_path):
    """A crafted archive whose pickle names a callable is refused, not executed."""
    payload = pickle.dumps(eval)  # GLOBAL builtins.eval
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", payload)
        zf.writestr("evil/constants.pkl", pickle.dumps(()))
        zf.writestr("evil/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match="does not load"):
        load_clip(path)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_clip(tmp_path / "evil.pt")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hugging_face_directory(tmp_path, act):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, vocab_size=49408, hidden_act=act),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=40,
    )
    torch.manual_seed(0)
    ref = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.ndim == 1 and "logit_scale" not in n:
                p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists()
    ours = rsitr.load_model(str(tmp_path / "hf"))
    # head counts come from config.json (not the 64-wide default): 4 and 3 heads here
    assert ours.cfg.text_heads == 4 and ours.cfg.vision_heads == 3
    assert ours.cfg.quick_gelu is (act == "quick_gelu")
    px, ids = _inputs(32)
    with torch.no_grad():
        out_i = ref.get_image_features(pixel_values=px)
        out_t = ref.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    out_i = getattr(out_i, "pooler_output", out_i)
    out_t = getattr(out_t, "pooler_output", out_t)
    _assert_same(ours, out_i, out_t, px, ids)
    torch.testing.assert_close(ours.logit_scale.detach(), ref.logit_scale.detach())


def test_vit_b32_architecture_inferred(open_clip, tmp_path):
    """A full-size open_clip ViT-B-32 state dict: architecture inferred, outputs identical."""
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    sd = ref.state_dict()
    cfg = infer_config(sd)
    assert cfg == CONFIGS["ViT-B-32"]
    torch.save(sd, tmp_path / "RemoteCLIP-ViT-B-32.pt")
    ours = rsitr.load_model(str(tmp_path / "RemoteCLIP-ViT-B-32.pt"))
    assert ours.info.name == "ViT-B-32"
    px, ids = _inputs(224, n=2)
    with torch.no_grad():
        _assert_same(ours, ref.encode_image(px), ref.encode_text(ids), px, ids)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14"])
def test_larger_configs_match_open_clip_shapes(open_clip, name):
    """Our named configs have exactly open_clip's tensor names and shapes."""
    ref = open_clip.create_model(name, pretrained=None)
    ours = CLIP.from_config(name)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert have == want
    assert infer_config(ref.state_dict()) == CONFIGS[name]


def test_features_and_interface():
    torch.manual_seed(0)
    m = CLIP.from_config("tiny").eval()
    px = torch.randn(2, 3, 64, 64)
    ids = m.tokenize(["a red car", "two boats in a harbour near the bridge"])
    with torch.no_grad():
        fi, ft = m.image_features(px), m.text_features(ids)
        assert fi.pooled.shape == (2, 128) and fi.tokens.shape == (2, 64, 128) and fi.mask.all()
        assert ft.tokens.shape == (2, 77, 128)
        assert ft.mask.sum(1).tolist() == [(ids[0] != 0).sum().item(), (ids[1] != 0).sum().item()]
        torch.testing.assert_close(m.encode_image(px), fi.pooled)
        torch.testing.assert_close(m.encode_text(ids), ft.pooled)
        # the pooled text embedding is the end-of-text token's feature
        eot = ids.argmax(-1)
        torch.testing.assert_close(ft.tokens[torch.arange(2), eot], ft.pooled)
        # causal mask: a token's feature does not depend on later tokens
        ids2 = ids.clone()
        ids2[1, 3] = 500
        ft2 = m.text_features(ids2)
        torch.testing.assert_close(ft2.tokens[1, :3], ft.tokens[1, :3])
    assert m.logit_scale is not None and "logit_scale" in dict(m.named_parameters())
    assert set(m.trainable_groups("heads")) == {"proj", "temperature"}
    assert m.trainable_groups("frozen") == {}


def test_adapter_slot_is_applied():
    torch.manual_seed(0)
    m = CLIP.from_config("tiny").eval()
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = m.encode_image(px)

        class Shift(torch.nn.Module):
            def forward(self, x, valid):
                return x + 1.0

        m.visual.transformer.resblocks[-1].adapter = Shift()
        assert not torch.allclose(m.encode_image(px), base)


def test_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_clip(tmp_path / "missing.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "notclip.pt")
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        load_clip(tmp_path / "notclip.pt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(tmp_path / "emptydir")
    m = CLIP.from_config("tiny")
    with pytest.raises(Exception, match="patches"):
        m.encode_image(torch.zeros(1, 3, 32, 32))
    sd = m.state_dict()
    del sd["visual.ln_post.weight"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_clip(tmp_path / "partial.pt")
    json.dumps(m.info.config)  # the config is JSON-serialisable (stored in checkpoints)
