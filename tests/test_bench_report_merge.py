"""`rsitr bench report RUN... --out DIR`: the cells of several run folders (one `bench run` per seed
or method, run side by side) reported as one, exactly as one folder holding them all would be; a cell
in two folders, or seeds of one method trained with other settings, refused."""
from __future__ import annotations

import json
import shutil

import pytest

from rsitr.bench.report import KEYS, report
from rsitr.cli import main
from rsitr.utils.errors import RsitrError


def _cell(root, name: str, seed: int, mr: float, **config) -> None:
    method = name
    d = root / "cells" / "synth" / method / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"seed": seed, "out_dir": str(d / "run"), "cache_dir": f"/cache/{seed}", "epochs": 2, "lr": 0.001,
           "data": {"path": f"/data/{root.name}", "workers": seed}, "method": {"name": method, "options": {}}}
    for k, v in config.items():
        cfg[k] = v
    test = {k: mr + i for i, k in enumerate(KEYS[:-1])}
    test["mR"] = mr
    rec = {"cell": f"synth/{method}/seed{seed}", "dataset": "synth", "method": method, "seed": seed, "status": "ok",
           "published": None, "test": test, "backbone": "clip:tiny", "mode": "full", "trainable_params": 1000 + seed,
           "train_seconds": 10.0 * (seed + 1), "config": cfg,
           "measurements": {"test_time": {"plain": mr, "tta8": mr + 1}}}
    (d / "cell.json").write_text(json.dumps(rec))


def _suite(root, text: str = "name: s\nmethods: {a: {}, b: {}}\n") -> None:
    (root / "suite.yaml").write_text(text)


@pytest.fixture()
def folders(tmp_path):
    a, b, c = tmp_path / "run-s0", tmp_path / "run-s1", tmp_path / "run-b"
    _cell(a, "a", 0, 30.0)
    _cell(b, "a", 1, 34.0)
    _cell(c, "b", 0, 20.0)
    _cell(c, "b", 1, 22.0)
    for r in (a, b, c):
        _suite(r)
    return tmp_path, [a, b, c]


def test_several_folders_report_as_the_one_folder_holding_their_cells(folders):
    tmp, srcs = folders
    md = report(tmp / "merged", sources=srcs)
    one = tmp / "one"
    for s in srcs:
        shutil.copytree(s / "cells", one / "cells", dirs_exist_ok=True)
    _suite(one)
    report(one)
    merged = json.loads((tmp / "merged" / "report.json").read_text())
    single = json.loads((one / "report.json").read_text())
    assert merged["rows"] == single["rows"]
    row = {r["method"]: r for r in merged["rows"]}
    assert row["a"]["seeds"] == 2 and row["a"]["mR"] == pytest.approx(32.0) and row["b"]["mR"] == pytest.approx(21.0)
    assert merged["sources"] == [str(s) for s in srcs]
    assert [c["run_folder"] for c in merged["cells"]] == [str(srcs[0]), str(srcs[1]), str(srcs[2]), str(srcs[2])]
    assert (tmp / "merged" / "suite.yaml").read_text() == (srcs[0] / "suite.yaml").read_text()
    assert all(f"`{s}`" in md for s in srcs) and "| a |" in md and "**32.00 ± 2.83**" in md


def test_folders_of_different_suites_report_without_a_suite(folders):
    tmp, srcs = folders
    _suite(srcs[2], "name: other\nmethods: {b: {}}\n")
    (tmp / "merged").mkdir()
    (tmp / "merged" / "suite.yaml").write_text("left from before\n")
    md = report(tmp / "merged", sources=srcs)
    assert not (tmp / "merged" / "suite.yaml").exists() and "## Suite" not in md


def test_the_same_cell_in_two_folders_is_refused(folders):
    tmp, srcs = folders
    _cell(tmp / "again", "a", 1, 99.0)
    with pytest.raises(RsitrError, match=r"synth/a/seed1 is in both .*run-s1 and .*again"):
        report(tmp / "merged", sources=[*srcs, tmp / "again"])
    assert not (tmp / "merged").exists()


@pytest.mark.parametrize("key,value", [("lr", 0.01), ("epochs", 3), ("method", {"name": "a", "options": {"k": 1}}),
                                       ("distill", {"teachers": ["t0"]})])
def test_seeds_of_one_method_with_other_settings_are_refused(tmp_path, key, value):
    _cell(tmp_path / "s0", "a", 0, 30.0)
    _cell(tmp_path / "s1", "a", 1, 34.0, **{key: value})
    with pytest.raises(RsitrError, match=rf"synth/a/seed0 and synth/a/seed1 trained with other settings \({key}"):
        report(tmp_path / "merged", sources=[tmp_path / "s0", tmp_path / "s1"])


def test_where_a_cell_ran_is_not_its_recipe(tmp_path):
    """Seeds differ in seed, out_dir, cache_dir, data.path and data.workers (set above per folder): one recipe."""
    _cell(tmp_path / "s0", "a", 0, 30.0, eval_batch_size=64, device="cpu")
    _cell(tmp_path / "s1", "a", 1, 34.0, eval_batch_size=256, device="cuda")
    report(tmp_path / "merged", sources=[tmp_path / "s0", tmp_path / "s1"])
    assert json.loads((tmp_path / "merged" / "report.json").read_text())["rows"][0]["seeds"] == 2


def test_bad_folders_are_one_line(folders, capsys, tmp_path):
    tmp, srcs = folders
    s = [str(x) for x in srcs]
    (tmp / "a-file").write_text("x")
    cases = [
        (s[:2], "give --out DIR"),
        ([*s, str(tmp / "nope"), "--out", str(tmp / "m")], "nope: not a folder"),
        ([*s, str(tmp), "--out", str(tmp / "m")], "no cells found"),
        (s + ["--out", s[0]], "is one of the run folders reported"),
        (s[:2] + ["--out", s[2]], "is a bench run folder"),
        (s + ["--out", str(tmp / "a-file")], "a-file"),
        (s + ["--out", str(tmp / "a-file" / "sub")], "a-file"),
    ]
    for argv, msg in cases:
        assert main(["-q", "bench", "report", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (argv, err)
    # one folder without --out: its own report, as before
    assert main(["-q", "bench", "report", s[2]]) == 0
    assert "| b |" in capsys.readouterr().out and (srcs[2] / "report.md").is_file()
