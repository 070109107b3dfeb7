"""Two-tower top mode (``model.mode: top:I,T``): the top of each trunk trains through cached
activations at a cut point; head(trunk(x)) is the full forward for every cut."""
from __future__ import annotations

import pytest
from conftest import real_towers
import torch

from rsitr.utils.errors import RsitrError

TEXTS = ["many cars are parked in the parking lot", "a river", "", "word " * 100, "two white storage tanks next to a harbour"]


@pytest.fixture(scope="module")
def towers():
    return real_towers(embed_dim=32)


def _apply(model, mode: str) -> dict:
    return model.apply_mode(mode)


@pytest.fixture
def reset(towers):
    yield towers
    _apply(towers, "heads")
    towers.eval()


@pytest.mark.parametrize("mode", ["top:1", "top:2,1", "top:3,2", "top:7,6", "top:0,3"])
def test_head_of_trunk_is_the_full_forward(reset, mode):
    towers = reset
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = towers.tokenize(TEXTS)
    _apply(towers, "heads")
    with torch.no_grad():
        ref_img, ref_txt = towers.image_features(x), towers.text_features(ids)
        _apply(towers, mode)
        towers.eval()
        img_trunk, txt_trunk = towers.image_trunk(x), towers.text_trunk(ids)
        img, txt = towers.image_head(img_trunk), towers.text_head(txt_trunk)
    i, t = (int(v) for v in (mode[4:] + ",0").split(",")[:2])
    if i:  # the trunk ends at a stage boundary: its tokens are the activations entering that stage
        side, width = {1: (7, 192), 2: (14, 112), 3: (14, 80), 7: (112, 32)}[i]  # Lite0 at 224 px
        assert img_trunk.tokens.shape == (2, side * side, width)
    else:
        assert img_trunk.tokens.shape[2] == 1280
    if t:
        assert txt_trunk.tokens.shape[2] == 384 and torch.equal(txt_trunk.mask, ids != 0)
    for a, b in ((img, ref_img), (txt, ref_txt)):
        torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.mask, b.mask)
    # the head also accepts fp16-stored activations (the cache) within fp16 precision
    half = towers.text_head(type(txt_trunk)(txt_trunk.pooled, txt_trunk.tokens.half().float(), txt_trunk.mask))
    assert torch.nn.functional.cosine_similarity(half.pooled, ref_txt.pooled).min() > 0.999


def test_only_the_top_blocks_and_heads_get_gradients(reset):
    towers = reset
    groups = _apply(towers, "top:2,1")
    assert set(groups) == {"image", "text", "image_head", "text_head"}
    names = {id(p): n for n, p in towers.named_parameters()}
    image = {names[id(p)] for p in groups["image"]}
    text = {names[id(p)] for p in groups["text"]}
    cut = towers.image_tower.stage_starts[5]
    assert cut == 11 and all(n.startswith(tuple(f"image_tower._blocks.{b}." for b in range(11, 16)) + ("image_tower._conv_head", "image_tower._bn1")) for n in image)
    assert any(n.startswith("image_tower._blocks.11.") for n in image) and any(n.startswith("image_tower._bn1") for n in image)
    assert text and all(n.startswith("text_tower.encoder.layer.5.") for n in text)
    assert not towers.trunk_trainable("image") and not towers.trunk_trainable("text")
    assert towers.trunk_cut("image") == "block11" and towers.trunk_cut("text") == "layer5"

    towers.train()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ids = towers.tokenize(TEXTS[:4])
    with torch.no_grad():
        ti, tt = towers.image_trunk(x), towers.text_trunk(ids)
    img, txt = towers.image_head(ti), towers.text_head(tt)
    (img.pooled.sum() + txt.pooled.sum() + img.tokens.pow(2).mean() + txt.tokens.pow(2).mean()).backward()
    got = {n for n, p in towers.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = image | text | {n for n in names.values() if n.startswith(("image_proj.", "text_proj."))}
    # every trainable tensor gets a gradient (BN affine weights included), nothing else does
    assert got == want
    # train mode: below the cut eval, the trained blocks train, their batch norm frozen (default)
    assert not towers.image_tower._blocks[10].training and not towers.text_tower.encoder.layer[4].training
    assert towers.image_tower._blocks[11].training and towers.text_tower.encoder.layer[5].training
    assert not towers.image_tower._blocks[11]._bn1.training and not towers.image_tower._bn1.training
    towers.zero_grad(set_to_none=True)

    _apply(towers, "top:2,1+bn")
    towers.train()
    assert towers.image_tower._blocks[11]._bn1.training and not towers.image_tower._blocks[10]._bn1.training
    # other modes: no cut, the whole tower is trunk (behaviour unchanged)
    _apply(towers, "heads")
    assert towers.trunk_cut("image") is None and towers.trunk_cut("text") is None
    assert towers.image_trunk(x[:1]).tokens.shape == (1, 49, 1280)


@pytest.mark.parametrize("bad", ["top", "top:", "top:8", "top:1,7", "top:0,0", "top:a", "top:1;2"])
def test_bad_top_modes_are_one_line_errors(towers, bad):
    with pytest.raises(RsitrError, match="model.mode"):
        towers.trainable_groups(bad)


def test_cache_key_changes_with_the_cut(reset, tmp_path):
    from rsitr.data.captions import load_dataset
    from rsitr.data.synth import write_synth
    from rsitr.data.transforms import EvalTransform
    from rsitr.models.trunk_cache import build_trunk_cache

    towers = reset
    ds = load_dataset(str(write_synth(tmp_path / "d", n_images=4, seed=2, image_size=64))).split("train")
    ev = EvalTransform(towers.preprocess)
    seen = {}
    for mode in ("heads", "top:1,1", "top:2,2"):
        _apply(towers, mode)
        c = build_trunk_cache(towers, ds, cache_dir=tmp_path / "c", eval_transform=ev, keep_tokens=False, progress=False)
        seen[mode] = (c.image[0].tokens.shape, c.text.tokens.shape)
        if mode != "heads":
            assert c.image[0].tokens.dtype == torch.float16 and c.text.tokens.dtype == torch.float16
    files = sorted(p.name for p in (tmp_path / "c").glob("*.pt"))  # (each has a .json description)
    assert len(files) == 6, files  # one image and one text cache per cut
    assert seen["heads"][0][1] == 0  # whole trunk, pooled-only run: no tokens
    assert seen["top:1,1"][0][2] == 192 and seen["top:2,2"][0][2] == 112  # cut activations kept
    assert seen["top:1,1"][1][2] == 384 and seen["top:1,1"][1][1] > 0


@pytest.fixture(scope="module")
def synth(synth_dataset):
    return synth_dataset(n_images=40, seed=3, image_size=64)


@pytest.mark.parametrize("method,extra", [("baseline", {}), ("ftf", {"method.options": {"fine_candidates": 4}}),
                                          ("iebaker", {"method.options": {"ker": True}, "method.positives": "multi"}),
                                          ("rdb", {"method.options": {"tsa_layers": [5]}}),
                                          ("combo", {"method.options": {"parts": {"iebaker": {"eba": True, "ker": True, "ker_negatives": 1, "sar": True},
                                                                                  "rdb": {"tsa_layers": [5]}, "ftf": {"fine_candidates": 4}}}})])
def test_training_smoke_and_checkpoint_round_trip(towers, synth, tmp_path, method, extra):
    from rsitr.data.captions import load_dataset
    from rsitr.methods.factory import load, load_model
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    over = {"data.path": str(synth), "out_dir": str(tmp_path / "run"), "model.backbone": "towers:efficientnet-lite0+minilm-l6",
            "model.mode": "top:1,1", "model.embed_dim": 32, "method.name": method, "epochs": 2, "batch_size": 8, "lr": 1e-3,
            "warmup_steps": 1, "eval_batch_size": 16, "cache_views": 2, "seed": 1, **extra}
    res = train(TrainConfig().override(over), progress=False)
    assert res.test is not None and res.trainable_params > 100_000  # top blocks + a MiniLM layer
    caches = list((tmp_path / "run" / "cache").glob("*.pt"))
    assert len([c for c in caches if c.name.startswith("img-")]) == 3  # train views 0, 1 and val view 0
    # the text trunk below the cut stays cached (RDB: TSA only in the trained layer 5)
    assert len([c for c in caches if c.name.startswith("txt-")]) == 2  # train and val captions
    state = torch.load(tmp_path / "run" / "checkpoint_best.pt", weights_only=True)["state"]
    assert any(k.startswith("backbone.image_tower._blocks.15.") for k in state)
    assert any(k.startswith("backbone.text_tower.encoder.layer.5.") for k in state)
    assert not any(k.startswith("backbone.image_tower._blocks.14.") for k in state)
    assert "backbone.image_tower._bn1.running_mean" in state  # buffers of trained modules too

    loaded = load(str(tmp_path / "run"))
    model = loaded.backbone
    assert model.trunk_cut("image") == "block15" and model.trunk_cut("text") == "layer5"
    ds = load_dataset(str(synth)).split("test")
    enc = encode_dataset(model, ds, batch_size=16, progress=False)
    # the trained top differs from the pretrained tower: the loaded model is not the fresh one
    fresh = load_model("towers:efficientnet-lite0+minilm-l6", embed_dim=32)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("image_proj", "text_proj"))}, strict=False)
    assert not torch.allclose(encode_dataset(fresh, ds, batch_size=16, progress=False).images, enc.images, atol=1e-4)
    from rsitr.eval.evaluate import evaluate

    again = evaluate(model, ds, loaded.method, batch_size=16, progress=False)
    if method == "baseline":  # the method's own scoring is the cosine: the run's test row
        assert again["mR"] == pytest.approx(res.test["mR"], abs=1e-6)


def test_rsicd_suite_parses_into_valid_configs(monkeypatch):
    from rsitr.bench.suite import load_suite
    from rsitr.train.config import TrainConfig

    monkeypatch.setenv("RSITR_RSICD", "/data/rsicd")
    s = load_suite("rsicd-towers")
    assert {c.method for c in s.cells} == {"baseline", "baseline-trainval", "baseline-fn", "baseline-mp", "iebaker", "ftf", "rdb", "combo",
                                           "rdb-e16", "ftf-e16", "iebaker-e16", "combo-e16"}
    assert len(s.cells) == 24 + 4  # the equal-epoch rows run seed 0 only (--seeds overrides)
    # the equal-epoch rows are their method at the baseline's epochs, nothing else changed
    by = {(c.method, c.seed): c.overrides for c in s.cells}
    for m in ("rdb", "ftf", "iebaker", "combo"):
        short, e16 = by[(m, 0)], by[(f"{m}-e16", 0)]
        assert e16["epochs"] == by[("baseline", 0)]["epochs"] == 16 and short["epochs"] < 16
        assert {k: v for k, v in e16.items() if k != "epochs"} == {k: v for k, v in short.items() if k != "epochs"}
    for c in s.cells:
        cfg = TrainConfig().override(c.overrides)  # every key exists
        assert cfg.data.path == "/data/rsicd" and cfg.model.mode.startswith("top:") and c.published == "RSICD"
        # the final-model row trains on the papers' whole training pool and has no validation split
        trainval = c.method == "baseline-trainval"
        assert (cfg.data.train_split, cfg.data.val_split) == (("train+val", "none") if trainval else ("train", "val"))


def test_batch_mode_bn_statistics_are_trained_checkpointed_and_restored(towers, synth, tmp_path):
    """``top:I,T+bn``: the trained blocks' batch norm runs on batch statistics, its running
    statistics move, are saved with the checkpoint and come back on load."""
    from rsitr.methods.factory import load_model
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    over = {"data.path": str(synth), "out_dir": str(tmp_path / "run"), "model.backbone": "towers:efficientnet-lite0+minilm-l6",
            "model.mode": "top:1+bn", "model.embed_dim": 32, "epochs": 1, "batch_size": 8, "warmup_steps": 1,
            "eval_every": 0, "eval_batch_size": 16, "seed": 2}
    train(TrainConfig().override(over), progress=False, evaluate_test=False)
    state = torch.load(tmp_path / "run" / "checkpoint_best.pt", weights_only=True)["state"]
    key = "backbone.image_tower._blocks.15._bn1.running_mean"
    assert not torch.allclose(state[key], towers.image_tower._blocks[15]._bn1.running_mean)
    model = load_model(str(tmp_path / "run"))
    assert torch.equal(model.image_tower._blocks[15]._bn1.running_mean, state[key])
    assert model.trunk_cut("image") == "block15" and model.trunk_cut("text") is None
