"""``method.name: combo``: several methods in one run (adapters, pair selection, losses, scoring)."""
from __future__ import annotations

import pytest
import torch

from rsitr.utils.errors import RsitrError


@pytest.fixture(scope="module")
def noisy(synth_dataset):
    return synth_dataset(n_images=24, seed=4, image_size=32, noise_frac=0.3)


def _cfg(data, out, parts, **over):
    from rsitr.train.config import TrainConfig

    return TrainConfig().override({
        "data.path": str(data), "out_dir": str(out), "model.backbone": "clip:tiny", "model.mode": "full",
        "epochs": 2, "max_steps": 12, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 64, "seed": 2,
        "augment.enabled": False, "method.name": "combo", "method.options": {"parts": parts}, **over,
    })


def test_combo_of_all_three_trains_reloads_and_scores(noisy, tmp_path):
    from rsitr.data.captions import load_dataset
    from rsitr.methods.factory import load
    from rsitr.eval.evaluate import encode_dataset, evaluate
    from rsitr.retrieval.rerank import sar
    from rsitr.train.loop import train

    parts = {"iebaker": {"eba": True, "eba_warmup_epochs": 1, "eba_fraction": 0.2, "ker": True, "ker_min_count": 1, "sar": True, "sar_k": 3},
             "rdb": {"teacher": "ema"}, "ftf": {"k": 4}}
    out = tmp_path / "run"
    res = train(_cfg(noisy, out, parts), progress=False)
    logs = res.history[-1]["terms"]  # epoch means of every logged term
    # every part contributed a loss term; the pooled InfoNCE only once (iEBAKER owns it)
    assert any(k.startswith("iebaker/loss_global") for k in logs) and any(k.startswith("rdb/cls") or k.startswith("rdb/consistency") for k in logs)
    assert any(k.startswith("ftf/loss_fine") for k in logs)
    assert not any(k in ("rdb/contrastive", "ftf/loss_coarse") for k in logs)
    assert (out / "eba_epoch2.tsv").is_file()  # EBA ran inside the combination (after its warm-up epoch)

    loaded = load(str(out))
    model, method = loaded.backbone, loaded.method
    assert method.name == "combo" and list(method.parts) == ["iebaker", "rdb", "ftf"]
    opts = method.options["parts"]
    assert opts["rdb"]["loss_contrastive"] is False and opts["ftf"]["coarse_weight"] == 0.0
    assert opts["iebaker"]["ker_vocab"] and opts["rdb"]["classes"]  # data-derived options persisted
    assert len(method.parts["rdb"].vea) > 0  # RDB's adapters were installed into the rebuilt backbone
    test = load_dataset(str(noisy)).split("test")
    assert evaluate(model, test, method=method, progress=False)["mR"] == pytest.approx(res.test["mR"])
    # scoring = FTF's two-stage matrices, each re-ranked by SAR in its own direction
    enc = encode_dataset(model, test, keep_tokens=True, progress=False)
    t2i, i2t = method.similarity_pair(model, enc)
    f_t2i, f_i2t = method.parts["ftf"].similarity_pair(model, enc)
    assert torch.allclose(t2i, sar(f_t2i, k=3, direction="t2i"))
    assert torch.allclose(i2t, sar(f_i2t, k=3, direction="i2t"))


def test_combo_option_errors(noisy, tmp_path):
    from rsitr.models.registry import build_backbone
    from rsitr.methods.base import build_method

    bb = build_backbone("clip:tiny", seed=0)
    with pytest.raises(RsitrError, match="options.parts"):
        build_method("combo", bb, {}, None)
    with pytest.raises(RsitrError, match="cannot combine"):
        build_method("combo", bb, {"parts": {"nope": {}}}, None)
    with pytest.raises(RsitrError, match="owns it"):
        build_method("combo", bb, {"parts": {"iebaker": {}, "baseline": {}}}, None)
    with pytest.raises(RsitrError, match="unknown combo option"):
        build_method("combo", bb, {"parts": {"ftf": {}}, "typo": 1}, None)
    # without dedup every part keeps its own InfoNCE
    m = build_method("combo", bb, {"parts": {"rdb": {}, "ftf": {}}, "dedup_contrastive": False}, None)
    assert m.options["parts"]["rdb"]["loss_contrastive"] is True and m.options["parts"]["ftf"]["coarse_weight"] == 1.0
    m = build_method("combo", bb, {"parts": {"rdb": {}, "ftf": {}}}, None)
    assert m.options["parts"]["rdb"]["loss_contrastive"] is True and m.options["parts"]["ftf"]["coarse_weight"] == 0.0
