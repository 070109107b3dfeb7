"""Every item rsitr keeps in a cache folder (trunk-feature caches, stored teacher passes, exported
ONNX graphs) goes through one policy (rsitr.utils.cachedir.load_or_compute), tested here as a class
with generated damage rather than one case per kind:

- an item that cannot be used (truncated anywhere, replaced by junk of any length, a readable file
  of other contents or shape, an ONNX graph without its export record) costs a recomputation with
  one warning naming the file, never the run; the result equals a fresh one and the file is replaced;
- a cache folder the item cannot be stored in (the disk full, a folder where the file goes) costs
  later runs a recomputation, never this one: the value is used, one warning says it was not stored.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fake_trunks
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _tiny_backbone import TinyBackbone
from rsitr.data.captions import load_dataset
from rsitr.data.imagesets import TrunkCache
from rsitr.data.transforms import EvalTransform
from rsitr.data.types import Features
from rsitr.models.trunk_cache import build_trunk_cache
from rsitr.train import distill

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# damage: (kind, fraction, junk): kept length of a truncation, or junk bytes, or a readable torch file of other contents
DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.just(b"")),
    st.tuples(st.just("junk"), st.just(0.0), st.binary(min_size=0, max_size=300)),
    st.tuples(st.just("other"), st.sampled_from([0.0, 1.0, 2.0, 3.0]), st.just(b"")),
)


def _damage(path: Path, damage, other_contents) -> None:
    kind, frac, junk = damage
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * frac)])
    elif kind == "junk":
        path.write_bytes(junk)
    else:
        torch.save(other_contents[int(frac) % len(other_contents)], path)


# -- trunk-feature caches ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(synth_dataset):
    return load_dataset(synth_dataset(n_images=10, seed=11, image_size=32)).split("train")


def _trunk(bb, ds, cache):
    return build_trunk_cache(bb, ds, cache_dir=cache, eval_transform=EvalTransform(bb.preprocess), batch_size=4, progress=False)


def _with_every_other(n: int, **fixed):
    """Every readable file of other contents (``n`` of them) as an explicit example; hypothesis draws the rest."""
    def wrap(test):
        for i in range(n):
            test = example(damage=("other", float(i), b""), **fixed)(test)
        return test
    return wrap


@SETTINGS
@_with_every_other(5, which="img")
@_with_every_other(5, which="txt")
@given(damage=DAMAGE, which=st.sampled_from(["img", "txt"]))
def test_a_trunk_cache_that_cannot_be_used_is_computed_again_and_replaced(dataset, tmp_path_factory, caplog, damage, which):
    cache = tmp_path_factory.mktemp("trunk")
    first = _trunk(fake_trunks(), dataset, cache)
    (path,) = cache.glob(f"{which}-*.pt")
    n = len(dataset) if which == "img" else first.text.pooled.shape[0]
    others = [{"pooled": torch.zeros(n + 1, 4), "tokens": torch.zeros(n + 1, 1, 4), "mask": torch.ones(n + 1, 1, dtype=torch.bool)},
              {"pooled": torch.zeros(n, 4)}, [1, 2, 3], {"pooled": "x", "tokens": 1, "mask": None},
              {"pooled": torch.zeros(n, 4), "tokens": torch.zeros(n - 1, 1, 4), "mask": torch.ones(n, 1, dtype=torch.bool)}]
    _damage(path, damage, others)
    bb = fake_trunks()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = _trunk(bb, dataset, cache)
    assert bb.calls > 0 and str(path) in caplog.text and "computing it again" in caplog.text
    got, want = (again.image[0], first.image[0]) if which == "img" else (again.text, first.text)
    assert torch.equal(got.pooled, want.pooled) and torch.equal(got.tokens, want.tokens)
    third = fake_trunks()
    _trunk(third, dataset, cache)
    assert third.calls == 0  # replaced: read back without a pass


# -- stored teacher passes -----------------------------------------------------------------------
def _teacher_setup():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bb = TinyBackbone()
    bb.info = dataclasses.replace(bb.info, name="mini")
    tokens = torch.randn(5, 4, 12, generator=torch.Generator().manual_seed(3))
    f = Features(tokens.mean(1), tokens, torch.ones(5, 4, dtype=torch.bool))
    cache = TrunkCache([f, f], f, ("img-" + "a" * 20, "img-" + "b" * 20, "txt-" + "c" * 20))
    return SimpleNamespace(backbone=bb, method=None), cache


@SETTINGS
@_with_every_other(6)
@given(damage=DAMAGE)
def test_a_stored_teacher_pass_that_cannot_be_used_is_run_again_and_replaced(tmp_path_factory, caplog, damage):
    folder = tmp_path_factory.mktemp("tch")
    teacher, cache = _teacher_setup()
    cpu = torch.device("cpu")
    first = distill.cached_teacher_pass(teacher, cache, 4, cpu, cache_dir=folder, sha256="0" * 64, describe={})
    (path,) = folder.glob("tch-*.pt")
    others = [{"image": first[0][:1], "text": first[1], "scale": first[2]}, {"image": first[0]}, [1, 2],
              {"image": torch.zeros(()), "text": torch.zeros(()), "scale": 1.0},
              {"image": first[0], "text": first[1], "scale": "ten"}, {"image": first[0], "text": first[1], "scale": torch.ones(3)}]
    _damage(path, damage, others)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = distill.cached_teacher_pass(teacher, cache, 4, cpu, cache_dir=folder, sha256="0" * 64, describe={})
    assert str(path) in caplog.text and "computing it again" in caplog.text
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    stored = torch.load(path, weights_only=True)
    assert torch.equal(stored["image"], first[0])


# -- exported ONNX graphs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    pytest.importorskip("onnxruntime")
    from rsitr.models.clip import CLIP

    torch.manual_seed(0)
    return CLIP.from_config("tiny").eval()


@pytest.fixture(scope="module")
def exported(tiny_clip, tmp_path_factory):
    """A folder with the tiny CLIP's two graphs exported once (copied per example)."""
    from rsitr.models.engine import engine_for

    folder = tmp_path_factory.mktemp("onnx-ref")
    engine_for(tiny_clip, "onnx", cache_dir=folder).describe()
    return folder


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=st.one_of(DAMAGE, st.tuples(st.just("no record"), st.just(0.0), st.just(b""))))
def test_an_onnx_graph_that_cannot_be_loaded_is_exported_again_and_replaced(tiny_clip, exported, tmp_path_factory, caplog, damage):
    from rsitr.models.engine import engine_for

    folder = tmp_path_factory.mktemp("onnx")
    for p in exported.iterdir():
        shutil.copy(p, folder / p.name)
    path = sorted(folder.glob("*.onnx"))[0]
    if damage[0] == "no record":
        path.with_suffix(".json").unlink()
    else:
        _damage(path, damage, [{"a": torch.zeros(3)}, [1], "graph", {}])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        eng = engine_for(tiny_clip, "onnx", cache_dir=folder)
        parts = eng.describe()["parts"]
    assert str(path) in caplog.text and "computing it again" in caplog.text
    assert eng.export_seconds > 0 and set(parts.values()) == {"onnx"}  # exported again, and used
    again = engine_for(tiny_clip, "onnx", cache_dir=folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parts = again.describe()["parts"]
    assert again.export_seconds == 0.0 and not caplog.text and set(parts.values()) == {"onnx"}  # stored in its place: read back


# -- a cache folder an item cannot be stored in --------------------------------------------------
def _full_disk(monkeypatch):
    import rsitr.utils.io as io

    real = io.tempfile.mkstemp

    def mkstemp(*a, **k):
        if str(k.get("prefix", "")).startswith((".img-", ".txt-", ".tch-")) or ".onnx." in str(k.get("prefix", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)


def _folder_in_place(folder: Path, pattern: str) -> None:
    """After a first run found the names: each item's file replaced by a non-empty folder."""
    for p in folder.glob(pattern):
        p.unlink()
        p.mkdir()
        (p / "keep").write_text("a user's file")


@pytest.mark.parametrize("failure", ["disk full", "a folder in its place"])
@pytest.mark.parametrize("kind", ["trunk cache", "teacher pass", "onnx graph"])
def test_an_item_that_cannot_be_stored_is_used_and_warned_about(kind, failure, dataset, tiny_clip, tmp_path, caplog, monkeypatch):
    folder = tmp_path / "cache"
    pattern = {"trunk cache": "*.pt", "teacher pass": "tch-*.pt", "onnx graph": "*.onnx"}[kind]

    def run():
        if kind == "trunk cache":
            bb = fake_trunks()
            out = _trunk(bb, dataset, folder)
            return (out.image[0].pooled, out.text.pooled), bb.calls > 0
        if kind == "teacher pass":
            teacher, cache = _teacher_setup()
            img, txt, _ = distill.cached_teacher_pass(teacher, cache, 4, torch.device("cpu"), cache_dir=folder, sha256="0" * 64, describe={})
            return (img, txt), True
        from rsitr.models.engine import engine_for

        eng = engine_for(tiny_clip, "onnx", cache_dir=folder)
        assert set(eng.describe()["parts"].values()) == {"onnx"}  # the graphs run, stored or not
        ids = tiny_clip.tokenize(["a river beside a road", "two tennis courts"])
        return (eng.encode_text(ids),), eng.export_seconds > 0

    want, _ = run()  # a working folder: the reference values, and the items' names
    if failure == "disk full":
        for p in list(folder.iterdir()):
            p.unlink()
        _full_disk(monkeypatch)
    else:
        _folder_in_place(folder, pattern)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got, computed = run()
    assert computed and "not stored" in caplog.text, caplog.text
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    assert not list(folder.glob(".*.tmp"))  # no temporary left behind
    if failure == "a folder in its place":
        assert all((p / "keep").read_text() == "a user's file" for p in folder.glob(pattern))  # never removed
