"""Distillation from teacher runs (``distill.*``): the affinity-mimicking loss, the config keys, and
the training loop with a teacher run folder (one teacher pass over the trunk cache, the term in
log.jsonl, resume with the same teachers, one-line refusals)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from _tiny_backbone import TinyBackbone
from rsitr.losses.distill import affinity_distill, teacher_affinity
from rsitr.train.config import TrainConfig
from rsitr.utils.errors import RsitrError

FAMILY = "distilltest"


def build_seeded(name: str, device: str, **_) -> TinyBackbone:
    """The tiny test backbone with a fixed initialisation (its trunks are the same in every build,
    as a pretrained trunk is); ``other`` is the same architecture under another name."""
    if name not in ("mini", "other"):
        raise ValueError(name)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyBackbone()
    model.info = dataclasses.replace(model.info, kind=FAMILY, name=name)
    return model.to(device)


@pytest.fixture(autouse=True)
def seeded_family(monkeypatch):
    from rsitr.models import registry

    registry.list_backbones()
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.register_backbone(FAMILY, names=lambda: ("mini", "other"))(build_seeded)


@pytest.fixture(scope="module")
def synth(synth_dataset) -> Path:
    return synth_dataset(n_images=24, seed=5, image_size=32)


def cfg_for(data: Path, out: Path, **over) -> TrainConfig:
    base = {"data.path": str(data), "out_dir": str(out), "model.backbone": f"{FAMILY}:mini", "model.mode": "heads", "epochs": 1,
            "batch_size": 8, "lr": 5e-3, "warmup_steps": 0, "eval_every": 0, "eval_batch_size": 16, "seed": 1, "log_every": 1,
            "cache_views": 2}
    base.update(over)
    return TrainConfig().override(base)


@pytest.fixture(scope="module")
def teacher_run(synth, tmp_path_factory) -> Path:
    """A tiny teacher trained a few steps (its run folder)."""
    from rsitr.models import registry
    from rsitr.train.loop import train

    saved = dict(registry._FAMILIES)
    registry.register_backbone(FAMILY, names=lambda: ("mini", "other"))(build_seeded)
    try:
        out = tmp_path_factory.mktemp("teacher")
        train(cfg_for(synth, out / "run", max_steps=4), progress=False, evaluate_test=False)
    finally:
        registry._FAMILIES.clear()
        registry._FAMILIES.update(saved)
    return out / "run"


# -- the loss ------------------------------------------------------------------------------------
def test_loss_is_zero_when_the_student_matches_the_teachers():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor([20.0, 20.0])
    for average in ("probs", "logits"):
        i2t, t2i = teacher_affinity(torch.stack([img, img]), torch.stack([txt, txt]), scale, average)
        for directions in ("both", "i2t", "t2i"):
            assert float(affinity_distill(img, txt, 20.0, i2t, t2i, directions)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(6, 8, generator=g)
    i2t, t2i = teacher_affinity(other[None], txt[None], scale[:1])
    assert float(affinity_distill(img, txt, 20.0, i2t, t2i)) > 1e-3
    # the rows are distributions: softmax rows of the teachers' similarity, i2t over texts, t2i over images
    assert torch.allclose(i2t.sum(1), torch.ones(6)) and torch.allclose(t2i.sum(1), torch.ones(6))


def test_two_teachers_average_as_probabilities_or_as_similarities():
    g = torch.Generator().manual_seed(1)
    ti, tt = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    scale = torch.tensor([10.0, 10.0])
    p_probs, _ = teacher_affinity(ti, tt, scale, "probs")
    p_logits, _ = teacher_affinity(ti, tt, scale, "logits")
    one = [teacher_affinity(ti[k : k + 1], tt[k : k + 1], scale[:1])[0] for k in range(2)]
    assert torch.allclose(p_probs, 0.5 * (one[0] + one[1]), atol=1e-6)
    assert not torch.allclose(p_logits, p_probs, atol=1e-3)


def test_the_gradient_moves_the_student_toward_the_teacher():
    g = torch.Generator().manual_seed(2)
    t_img, t_txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    i2t, t2i = teacher_affinity(t_img[None], t_txt[None], torch.tensor([10.0]))
    s_img = torch.randn(8, 16, generator=g).requires_grad_(True)
    s_txt = torch.randn(8, 16, generator=g).requires_grad_(True)

    @torch.no_grad()
    def gap() -> float:  # how far the student's similarity matrix is from the teacher's
        s = torch.nn.functional.normalize(s_img, dim=-1) @ torch.nn.functional.normalize(s_txt, dim=-1).t()
        t = torch.nn.functional.normalize(t_img, dim=-1) @ torch.nn.functional.normalize(t_txt, dim=-1).t()
        return float((s - t).abs().mean())

    opt = torch.optim.SGD([s_img, s_txt], lr=0.5)
    losses, gap0 = [], gap()
    for _ in range(60):
        opt.zero_grad()
        loss = affinity_distill(s_img, s_txt, 10.0, i2t, t2i)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    assert gap() < 0.5 * gap0


# -- config --------------------------------------------------------------------------------------
def test_config_defaults_ranges_and_choices():
    cfg = TrainConfig()
    assert cfg.distill.teachers == () and cfg.distill.weight == 1.0 and cfg.distill.temperature is None
    assert cfg.distill.directions == "both" and cfg.distill.average == "probs"
    assert cfg.override({"distill.teachers": "runs/a"}).distill.teachers == ("runs/a",)  # one --set path
    assert cfg.override({"distill.teachers": ["a", "b"], "distill.temperature": 0.05}).distill.temperature == 0.05
    for key, bad, msg in (("distill.weight", 0, "distill.weight: must be > 0"), ("distill.temperature", -1.0, "distill.temperature: must be > 0"),
                          ("distill.directions", "up", "distill.directions: must be one of"), ("distill.average", "max", "distill.average: must be one of")):
        with pytest.raises(RsitrError, match=msg):
            cfg.override({key: bad})
    with pytest.raises(RsitrError, match="one digest per teacher"):
        cfg.override({"distill.teachers": ["a"], "distill.sha256": ["x", "y"]})


# -- the training loop ---------------------------------------------------------------------------
def test_training_with_a_teacher_run(synth, teacher_run, tmp_path, monkeypatch):
    from rsitr.train import distill
    from rsitr.train.loop import train

    calls = []
    real_pass = distill.teacher_pass

    def counting(*a, **k):
        calls.append(1)
        return real_pass(*a, **k)

    monkeypatch.setattr(distill, "teacher_pass", counting)
    from rsitr.utils import io

    hashed: list[Path] = []
    real_sha = io.sha256_file
    monkeypatch.setattr(io, "_SHA_CACHE", {})
    monkeypatch.setattr(io, "sha256_file", lambda p, *a, **k: (hashed.append(Path(p)), real_sha(p, *a, **k))[1])
    out = tmp_path / "student"
    steps: list[int] = []
    res = train(cfg_for(synth, out, epochs=2, **{"distill.teachers": [str(teacher_run)], "distill.weight": 2.0}), progress=False,
                evaluate_test=False, on_step=steps.append)
    assert res.steps == len(steps) > 4 and len(calls) == 1  # one teacher pass, not one per step
    # the teacher file is read for hashing once (pinned, then loaded), not once per resolve
    assert hashed.count((teacher_run / "checkpoint_best.pt").resolve()) == 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        t = r["terms"]
        assert t["distill"] > 0 and r["loss"] == pytest.approx(t["task"] + 2.0 * t["distill"], rel=1e-4)
    recorded = json.loads((out / "config.json").read_text())["distill"]
    teacher_file = teacher_run / "checkpoint_best.pt"
    assert recorded["teachers"] == [str(teacher_run)]
    assert recorded["sha256"] == [hashlib.sha256(teacher_file.read_bytes()).hexdigest()]
    from rsitr.models.checkpoint import TrainCheckpoint

    assert list(TrainCheckpoint.load(out / "checkpoint_last.pt").config["distill"]["sha256"]) == recorded["sha256"]


def test_distillation_changes_training_and_the_teacher_is_no_trainable_part(synth, teacher_run, tmp_path):
    from rsitr.train.loop import train

    plain = train(cfg_for(synth, tmp_path / "plain", max_steps=3), progress=False, evaluate_test=False)
    dist = train(cfg_for(synth, tmp_path / "dist", max_steps=3, **{"distill.teachers": [str(teacher_run)]}), progress=False, evaluate_test=False)
    assert plain.trainable_params == dist.trainable_params
    a = torch.load(tmp_path / "plain" / "checkpoint_last.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "dist" / "checkpoint_last.pt", weights_only=True)["state"]
    assert a.keys() == b.keys()  # no teacher tensors in the student's checkpoint
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_teachers(synth, teacher_run, tmp_path):
    from rsitr.train.loop import train

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    out = tmp_path / "student"
    over = {"distill.teachers": [str(teacher)], "save_every_steps": 1, "max_steps": 4}

    def crash(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(synth, out, **over), progress=False, evaluate_test=False, on_step=crash)
    # resumed with the same teachers: continues where it stopped, ending as a run without the stop
    res = train(cfg_for(synth, out, **over), resume=True, progress=False, evaluate_test=False)
    straight = tmp_path / "straight"
    train(cfg_for(synth, straight, **over), progress=False, evaluate_test=False)
    a = torch.load(out / "checkpoint_last.pt", weights_only=True)["state"]
    b = torch.load(straight / "checkpoint_last.pt", weights_only=True)["state"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert res.steps == 4 and "distill" in json.loads((out / "log.jsonl").read_text().splitlines()[-1])["terms"]
    # other teachers (or none): refused
    for other in ([], [str(teacher), str(teacher)]):
        with pytest.raises(RsitrError, match="a resumed run keeps its teachers"):
            train(cfg_for(synth, out, max_steps=6, save_every_steps=1, **{"distill.teachers": other}), resume=True, progress=False, evaluate_test=False)
    # the teacher file changed since: refused
    best = teacher / "checkpoint_best.pt"
    state = torch.load(best, weights_only=True)
    state["best"] = {"epoch": 99}
    torch.save(state, best)
    with pytest.raises(RsitrError, match="changed since the run recorded it") as exc:
        train(cfg_for(synth, out, **{**over, "max_steps": 6}), resume=True, progress=False, evaluate_test=False)
    assert "\n" not in str(exc.value)


def test_bad_teachers_are_one_line_errors(synth, teacher_run, tmp_path):
    from rsitr.train.loop import train

    with pytest.raises(RsitrError, match="distill.teachers: .*checkpoint not found") as exc:
        train(cfg_for(synth, tmp_path / "a", max_steps=1, **{"distill.teachers": [str(tmp_path / "nope.pt")]}), progress=False)
    assert "\n" not in str(exc.value)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(RsitrError, match="no checkpoint_best.pt or checkpoint_last.pt"):
        train(cfg_for(synth, tmp_path / "b", max_steps=1, **{"distill.teachers": [str(empty)]}), progress=False)
    # another backbone (trunk) than the student's: refused, naming both
    with pytest.raises(RsitrError) as exc:
        train(cfg_for(synth, tmp_path / "c", max_steps=1, **{"model.backbone": f"{FAMILY}:other", "distill.teachers": [str(teacher_run)]}),
              progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and f"{FAMILY}:mini" in msg and f"{FAMILY}:other" in msg and "image trunk" in msg
    # a student without a trunk cache (trainable trunks): refused
    with pytest.raises(RsitrError, match="has none") as exc:
        train(cfg_for(synth, tmp_path / "d", max_steps=1, **{"model.mode": "full", "distill.teachers": [str(teacher_run)]}), progress=False)
    assert "\n" not in str(exc.value)


def test_cli_reports_a_bad_teacher_in_one_line(synth, tmp_path, capsys):
    from rsitr.cli import main

    code = main(["--threads", "1", "-q", "train", "--data", str(synth), "--out", str(tmp_path / "run"), "--backbone", f"{FAMILY}:mini",
                 "--mode", "heads", "--teacher", str(tmp_path / "missing"), "--set", "max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("rsitr: error: distill.teachers:") and "missing" in err


def test_teacher_pass_covers_every_cached_view_and_a_batch_looks_up_its_own():
    """The teachers' embeddings are per (image, cached view) and per caption: a student that
    equals the teacher on the batch's drawn views scores 0, the same batch with other views does not."""
    from types import SimpleNamespace

    from rsitr.data.imagesets import TrunkCache
    from rsitr.data.types import Features
    from rsitr.train.distill import Teachers, teacher_pass

    bb = build_seeded("mini", "cpu")
    g = torch.Generator().manual_seed(3)
    n_img, n_txt, views = 6, 12, 3

    def feats(n: int) -> Features:
        tokens = torch.randn(n, 4, 12, generator=g)
        return Features(tokens.mean(1), tokens, torch.ones(n, 4, dtype=torch.bool))

    cache = TrunkCache([feats(n_img) for _ in range(views)], feats(n_txt))
    img, txt, scale = teacher_pass(SimpleNamespace(backbone=bb, method=None), cache, batch_size=4, device=torch.device("cpu"))
    assert img.shape == (views, n_img, 8) and txt.shape == (n_txt, 8) and img.dtype == torch.float16
    teachers = Teachers(img[None], txt[None], torch.tensor([scale]), 1.0, 0.05, "both", "probs")
    ii, vi, ti = torch.tensor([0, 2, 3, 5]), torch.tensor([2, 0, 1, 1]), torch.tensor([1, 4, 7, 11])
    with torch.no_grad():
        s_img = torch.stack([bb.image_head(Features(*(x[i : i + 1] for x in (cache.image[v].pooled, cache.image[v].tokens, cache.image[v].mask)))).pooled[0]
                             for i, v in zip(ii.tolist(), vi.tolist())])
        s_txt = bb.text_head(Features(cache.text.pooled[ti], cache.text.tokens[ti], cache.text.mask[ti])).pooled
    batch = {"image_index": ii, "image_view": vi, "text_index": ti}
    assert float(teachers.loss(s_img, s_txt, torch.tensor(0.0), batch)) < 1e-3  # fp16 storage
    assert float(teachers.loss(s_img, s_txt, torch.tensor(0.0), {**batch, "image_view": (vi + 1) % views})) > 1e-2


def test_a_teacher_pass_is_stored_beside_the_trunk_cache_and_read_by_later_runs(synth, teacher_run, tmp_path, monkeypatch, caplog):
    """The pass is written once (tch-<key>.pt in the run's cache_dir) and read by a resumed run and
    by other students of the same teacher over the same trunk cache; what they train is what a run
    that ran the pass itself trains. Another teacher file, or another trunk cache, is another pass."""
    from rsitr.train import distill
    from rsitr.train.loop import train
    from rsitr.utils.cachedir import scan

    calls = []
    real_pass = distill.teacher_pass
    monkeypatch.setattr(distill, "teacher_pass", lambda *a, **k: (calls.append(1), real_pass(*a, **k))[1])
    shared = tmp_path / "cache"

    def student(out: Path, cache: Path, teacher: Path = teacher_run, **over) -> Path:
        train(cfg_for(synth, out, **{"max_steps": 4, "cache_dir": str(cache), "cache_seed": 0, "distill.teachers": [str(teacher)], **over}),
              progress=False, evaluate_test=False)
        return out

    student(tmp_path / "s1", shared, seed=1)
    stored = sorted(shared.glob("tch-*.pt"))
    assert len(calls) == 1 and len(stored) == 1
    item = next(it for it in scan(shared) if it.path == stored[0])
    assert item.kind == "teacher pass" and "2 views x 16 images / 80 captions" in item.summary()  # the train split
    # another seed of the student over the same trunk cache: read, not run; trains as a run that ran it
    s2 = student(tmp_path / "s2", shared, seed=2)
    assert len(calls) == 1
    fresh = student(tmp_path / "s2-fresh", tmp_path / "own-cache", seed=2)
    assert len(calls) == 2
    a = torch.load(s2 / "checkpoint_last.pt", weights_only=True)["state"]
    b = torch.load(fresh / "checkpoint_last.pt", weights_only=True)["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resumed run reads it too
    crashed = tmp_path / "s3"

    def crash(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(synth, crashed, max_steps=4, save_every_steps=1, cache_dir=str(shared), cache_seed=0, **{"distill.teachers": [str(teacher_run)]}),
              progress=False, evaluate_test=False, on_step=crash)
    train(cfg_for(synth, crashed, max_steps=4, save_every_steps=1, cache_dir=str(shared), cache_seed=0, **{"distill.teachers": [str(teacher_run)]}),
          resume=True, progress=False, evaluate_test=False)
    assert len(calls) == 2
    # another teacher file (same weights, another checkpoint record: another sha256): its own pass
    other = tmp_path / "teacher2"
    shutil.copytree(teacher_run, other)
    state = torch.load(other / "checkpoint_best.pt", weights_only=True)
    state["best"] = {"epoch": 99}
    torch.save(state, other / "checkpoint_best.pt")
    student(tmp_path / "s4", shared, teacher=other, seed=1)
    assert len(calls) == 3 and len(list(shared.glob("tch-*.pt"))) == 2
    # other trunk-cache views (cache_seed): another pass
    student(tmp_path / "s5", shared, seed=1, cache_seed=7)
    assert len(calls) == 4 and len(list(shared.glob("tch-*.pt"))) == 3
    # a stored pass that cannot be read costs a pass, not the run: one warning naming the file, the
    # pass run again and stored in its place (tests/test_cache_items.py: every kind of damage)
    stored[0].write_bytes(b"not a torch file")
    with caplog.at_level("WARNING"):
        student(tmp_path / "s6", shared, seed=1)
    assert len(calls) == 5 and str(stored[0]) in caplog.text and "computing it again" in caplog.text
    assert set(torch.load(stored[0], weights_only=True)) == {"image", "text", "scale"}


def test_a_stored_pass_of_another_shape_is_run_again(tmp_path, caplog):
    """A stored pass whose shape does not fit the cache (not possible under one key unless the file
    was replaced) is run again and overwritten, with a warning."""
    from types import SimpleNamespace

    from rsitr.data.imagesets import TrunkCache
    from rsitr.data.types import Features
    from rsitr.train.distill import cached_teacher_pass, pass_key

    bb = build_seeded("mini", "cpu")
    tokens = torch.randn(5, 4, 12, generator=torch.Generator().manual_seed(1))
    f = Features(tokens.mean(1), tokens, torch.ones(5, 4, dtype=torch.bool))
    cache = TrunkCache([f, f], f, ("img-" + "a" * 20, "img-" + "b" * 20, "txt-" + "c" * 20))
    teacher, cpu = SimpleNamespace(backbone=bb, method=None), torch.device("cpu")
    first = cached_teacher_pass(teacher, cache, 4, cpu, cache_dir=tmp_path, sha256="0" * 64, describe={})
    path = tmp_path / f"tch-{pass_key('0' * 64, cache, 4, cpu)}.pt"
    assert path.is_file() and first[0].shape == (2, 5, 8)
    assert pass_key("0" * 64, TrunkCache([f], f), 4, cpu) is None  # a cache without files names no pass
    assert pass_key("0" * 64, cache, 8, cpu) != pass_key("0" * 64, cache, 4, cpu) != pass_key("1" * 64, cache, 4, cpu)
    torch.save({"image": first[0][:1], "text": first[1], "scale": first[2]}, path)
    with caplog.at_level("WARNING"):
        again = cached_teacher_pass(teacher, cache, 4, cpu, cache_dir=tmp_path, sha256="0" * 64, describe={})
    assert "another shape" in caplog.text and torch.equal(again[0], first[0])
    assert torch.load(path, weights_only=True)["image"].shape == (2, 5, 8)


def test_a_student_of_a_mix_names_every_part_of_its_trunk_cache(synth, synth_dataset, teacher_run, tmp_path):
    """A mix's trunk cache is its parts' caches: the stored pass is keyed by every part's files (each
    view of each part, then each part's text), all of which exist in the cache folder."""
    from rsitr.train.loop import train

    other = synth_dataset(n_images=18, seed=9, image_size=32)
    cache = tmp_path / "cache"
    train(cfg_for(synth, tmp_path / "mix", **{"max_steps": 2, "cache_dir": str(cache), "cache_seed": 0, "data.path": "",
                                              "data.sources": [{"path": str(synth), "name": "a"}, {"path": str(other), "name": "b"}],
                                              "distill.teachers": [str(teacher_run)]}), progress=False, evaluate_test=False)
    (desc,) = [json.loads(p.read_text()) for p in cache.glob("tch-*.json")]
    trunk = desc["trunk"]
    assert len(trunk) == 6 and len(set(trunk)) == 6  # 2 parts x (2 image views + text)
    assert [k[:3] for k in trunk] == ["img", "img", "txt", "img", "img", "txt"]
    assert all((cache / f"{k}.pt").is_file() for k in trunk)
    assert desc["views"] == 2 and desc["entries"] == 16 + 12 and desc["captions"] == 5 * (16 + 12)


@pytest.mark.parametrize("failure", ["a folder in its place", "disk full"])
def test_a_pass_that_cannot_be_stored_is_used_and_warned_about(tmp_path, caplog, monkeypatch, failure):
    """A cache folder the pass cannot be written to (read-only, full, a folder where the file goes)
    costs the next run a pass, never this run: the pass is used, one warning says it was not stored."""
    from types import SimpleNamespace

    from rsitr.data.imagesets import TrunkCache
    from rsitr.data.types import Features
    from rsitr.train import distill

    bb = build_seeded("mini", "cpu")
    tokens = torch.randn(5, 4, 12, generator=torch.Generator().manual_seed(2))
    f = Features(tokens.mean(1), tokens, torch.ones(5, 4, dtype=torch.bool))
    cache = TrunkCache([f], f, ("img-" + "d" * 20, "txt-" + "e" * 20))
    teacher, cpu = SimpleNamespace(backbone=bb, method=None), torch.device("cpu")
    path = tmp_path / f"tch-{distill.pass_key('0' * 64, cache, 4, cpu)}.pt"
    if failure == "a folder in its place":
        path.mkdir()
    else:
        real = torch.save

        def full(obj, where, *a, **k):
            if str(where).endswith(".tmp"):
                raise OSError(28, "No space left on device")
            return real(obj, where, *a, **k)

        monkeypatch.setattr(distill.torch, "save", full)
    with caplog.at_level("WARNING"):
        img, txt, _ = distill.cached_teacher_pass(teacher, cache, 4, cpu, cache_dir=tmp_path, sha256="0" * 64, describe={})
    assert img.shape == (1, 5, 8) and txt.shape == (5, 8)
    assert "not stored" in caplog.text and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
