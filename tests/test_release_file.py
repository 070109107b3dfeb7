"""A release file (``rsitr models build|evaluate|qbank RELEASE.yaml``) is user input: every field is
checked when it is read, and a bad one is one error line naming the file and the key -- never a
traceback, and never a value that fails later inside a build."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rsitr.bench.release import EvalSet, QBankSpec, Release
from rsitr.utils.errors import RsitrError

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "rsitr" / "configs" / "releases"
GOOD = yaml.safe_load((SHIPPED / "rsitr-lite0-minilm-rs2.yaml").read_text())

# every place a value sits in a release file, as a path of keys / list indexes
PLACES = [("name",), ("config",), ("seed",), ("overrides",), ("ttas",), ("qbnorm_beta",), ("card",), ("eval_sets",), ("qbank",),
          ("eval_sets", 0), ("eval_sets", 0, "label"), ("eval_sets", 0, "data"), ("eval_sets", 0, "split"), ("eval_sets", 0, "bank"),
          ("eval_sets", 0, "format"), ("eval_sets", 0, "image_root"), ("eval_sets", 2, "zero_shot"), ("eval_sets", 1, "label"),
          ("qbank", "sources"), ("qbank", "split"), ("qbank", "size"), ("qbank", "seed"), ("qbank", "beta"),
          ("card", "ground_tiles_m"), ("card", "test_time_views_default"), ("ttas", 0), ("card", "ground_tiles_m", 1),
          ("teachers",), ("overrides", "distill.teachers"), ("bogus",), ("eval_sets", 0, "bogus"), ("qbank", "bogus")]

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 20), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.lists(st.one_of(st.integers(-2, 9), st.text(max_size=3), st.floats(allow_nan=True)), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _write(tmp_path: Path, raw) -> Path:
    f = tmp_path / "rel.yaml"
    f.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return f


def _set(raw: dict, place: tuple, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for k in place[:-1]:
        node = node[k]
    node[place[-1]] = value
    return raw


def _well_typed(rel: Release) -> None:
    assert isinstance(rel.name, str) and rel.name and isinstance(rel.config, str) and rel.config
    assert isinstance(rel.seed, int) and not isinstance(rel.seed, bool) and rel.seed >= 0
    assert rel.ttas and all(t in (1, 4, 8) and not isinstance(t, bool) for t in rel.ttas)
    assert math.isfinite(rel.qbnorm_beta) and rel.qbnorm_beta > 0
    assert all(isinstance(s, EvalSet) and isinstance(s.label, str) and isinstance(s.zero_shot, bool) for s in rel.eval_sets)
    assert len({s.label for s in rel.eval_sets}) == len(rel.eval_sets)
    if rel.qbank is not None:
        q = rel.qbank
        assert isinstance(q, QBankSpec) and q.sources and set(q.sources) <= {s.label for s in rel.eval_sets}
        assert q.size is None or (isinstance(q.size, int) and not isinstance(q.size, bool) and q.size >= 1)
        assert isinstance(q.seed, int) and not isinstance(q.seed, bool) and q.seed >= 0
        assert q.beta is None or (math.isfinite(q.beta) and q.beta > 0)
    tiles = rel.card.get("ground_tiles_m")
    assert tiles is None or all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf for t in tiles)
    assert rel.card.get("test_time_views_default", 1) in (1, 4, 8)
    assert isinstance(rel.teachers, tuple) and len(set(rel.teachers)) == len(rel.teachers)
    assert all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in rel.teachers)
    assert not rel.teachers or not {"distill.teachers", "distill.sha256"} & set(rel.overrides)


def test_the_shipped_release_files_read():
    for f in sorted(SHIPPED.glob("*.yaml")):
        _well_typed(Release.from_yaml(f))


@settings(max_examples=400, deadline=None)
@given(place=st.sampled_from(PLACES), value=VALUES)
def test_a_generated_bad_field_is_one_error_line(tmp_path_factory, place, value):
    """One field of the shipped release file replaced by a generated value: the file reads into a
    well-typed release, or is refused with one RsitrError line naming the file."""
    f = _write(tmp_path_factory.mktemp("rel"), _set(GOOD, place, value))
    try:
        rel = Release.from_yaml(f)
    except RsitrError as exc:
        msg = str(exc)
        assert msg.startswith(str(f)) and "\n" not in msg
        return
    _well_typed(rel)
    assert place[-1] != "bogus"  # an unknown key is never accepted


@pytest.mark.parametrize("text,msg", [
    ("", "needs at least 'name' and 'config'"), ("[1, 2]", "needs at least"), ("name: x\nconfig: [", "not valid YAML at line 2, column 10"),
    ("name: x\nconfig: c.yaml\nttas: [1, 3]", "ttas must be"), ("name: x\nconfig: c.yaml\nttas: 8", "ttas must be"),
    ("name: x\nconfig: c.yaml\nseed: -1", "seed must be"), ("name: x\nconfig: c.yaml\nseed: '3'", "seed must be"),
    ("name: x\nconfig: c.yaml\nqbnorm_beta: .nan", "qbnorm_beta must be"), ("name: x\nconfig: c.yaml\nqbnorm_beta: 0", "qbnorm_beta must be"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a}]", "eval_sets[0] must be a mapping with at least label and data"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a, data: d, views: 8}]", "unknown key(s) ['views']"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a, data: d}, {label: a, data: e}]", "labels must be unique"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a, data: d}]\nqbank: {sources: [b]}", "qbank.sources must name"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a, data: d}]\nqbank: {sources: [a], size: 0}", "qbank.size must be"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a, data: d}]\nqbank: {sources: [a], size: many}", "qbank.size must be"),
    ("name: x\nconfig: c.yaml\neval_sets: [{label: a, data: d}]\nqbank: {sources: [a], beta: -2}", "qbank.beta must be"),
    ("name: x\nconfig: c.yaml\ncard: {ground_tiles_m: [80, 0]}", "card.ground_tiles_m must be"),
    ("name: x\nconfig: c.yaml\ncard: {test_time_views_default: 3}", "card.test_time_views_default must be"),
    ("name: x\nconfig: c.yaml\nepochs: 3", "unknown key(s) ['epochs']"),
    ("name: x\nconfig: c.yaml\nteachers: [0, 0]", "teachers must be a list of distinct teacher seeds"),
    ("name: x\nconfig: c.yaml\nteachers: [-1]", "teachers must be"), ("name: x\nconfig: c.yaml\nteachers: 2", "teachers must be"),
    ("name: x\nconfig: c.yaml\nteachers: [1.0]", "teachers must be"),
    ("name: x\nconfig: c.yaml\nteachers: [0]\noverrides: {distill.teachers: [a]}", "overrides must be free of distill.teachers"),
    ("name: x\nconfig: c.yaml\nteachers: [0]\noverrides: {distill: {sha256: [a]}}", "overrides must be free of distill.teachers"),
])
def test_bad_release_files_name_the_key(tmp_path, text, msg):
    with pytest.raises(RsitrError) as info:
        Release.from_yaml(_write(tmp_path, text))
    assert msg in str(info.value) and "\n" not in str(info.value)


def test_models_commands_print_one_line(tmp_path, capsys):
    from rsitr.cli import main

    f = _write(tmp_path, "name: x\nconfig: c.yaml\nttas: [1, 3]")
    for argv in (["models", "evaluate", str(f)], ["models", "build", str(f), "--no-train", "--run", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "ttas must be" in err and "Traceback" not in err


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=64), st.text(max_size=40).map(lambda t: t.encode("utf-8")),
                      st.sampled_from([b"a: [", b"a: {b", b"\xff\xfe\x00", b"- x\n y: : z", b"\t- a", b"name: x\nconfig: y\n\x00"])))
def test_every_yaml_reader_refuses_bad_bytes_in_one_line(tmp_path_factory, data):
    """The release file, the training config and a bench suite, given generated bytes (binary,
    broken YAML, text of another shape): read, or one RsitrError line -- never a traceback."""
    from rsitr.bench.suite import load_suite
    from rsitr.train.config import TrainConfig

    f = tmp_path_factory.mktemp("y") / "f.yaml"
    f.write_bytes(data)
    for read in (Release.from_yaml, TrainConfig.from_yaml, load_suite, lambda f: load_suite(f, sets={"epochs": 2})):
        try:
            read(str(f))
        except RsitrError as exc:
            assert "\n" not in str(exc), (read, str(exc))
