"""Bench suites: cells run in their own process, resume skips finished cells, a failing cell is
recorded and the rest go on, the report renders."""
from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsitr.bench.report import published_rows, render_measurements, report, summarize
from rsitr.bench.suite import collect, load_suite, run_suite
from rsitr.cli import main
from rsitr.utils.errors import RsitrError

SUITE = """
name: tiny
base:
  model.backbone: clip:tiny
  model.mode: full
  epochs: 1
  max_steps: 2
  batch_size: 16
  eval_batch_size: 64
  augment.enabled: false
datasets:
  synth:
    synth: {images: 60, seed: 1}
    published: UCM
methods:
  baseline: {method.name: baseline}
  broken: {method.name: baseline, model.mode: no-such-mode}
seeds: [0, 1]
"""


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    suite_file = root / "tiny.yaml"
    suite_file.write_text(SUITE)
    out = root / "run"
    records = run_suite(load_suite(str(suite_file)), out, progress=False)
    return suite_file, out, records


@pytest.mark.slow
def test_cells_run_and_failures_are_recorded(bench_run):
    _, out, records = bench_run
    status = {r["cell"]: r["status"] for r in records}
    assert status == {"synth/baseline/seed0": "ok", "synth/baseline/seed1": "ok", "synth/broken/seed0": "failed", "synth/broken/seed1": "failed"}
    ok = [r for r in records if r["status"] == "ok"]
    for r in ok:
        assert 0.0 <= r["test"]["mR"] <= 100.0
        assert r["trainable_params"] > 0 and r["peak_rss_mb"] > 0 and r["images_per_s"] > 0
        assert r["query_ms_p50"] is not None and r["environment"]["torch"]
        ties = r["test_ties"]  # the best checkpoint re-scored under every tie convention
        assert ties["expected"]["mR"] == pytest.approx(r["test"]["mR"], abs=1e-6)
        for k in ("i2t_r1", "t2i_r1", "mR"):
            assert ties["pessimistic"][k] <= ties["expected"][k] + 1e-9 <= ties["optimistic"][k] + 2e-9
    bad = [r for r in records if r["status"] == "failed"]
    assert all("no-such-mode" in r["error"] for r in bad)
    # a cell that refuses its settings records the refusal's one line, not a traceback
    assert all("Traceback" not in r["error"] and len(r["error"].splitlines()) == 1 for r in bad)
    # one frozen-trunk cache folder per run folder, shared by every cell
    specs = [json.loads(p.read_text()) for p in out.glob("cells/*/*/seed*/spec.json")]
    assert len(specs) == 4 and {s["overrides"]["cache_dir"] for s in specs} == {str(out / "cache")}
    # the two seeds differ (different head init / order) but share the generated dataset
    assert (out / "data" / "synth" / "dataset_synth.json").is_file()


@pytest.mark.slow
def test_resume_skips_finished_cells(bench_run, capsys):
    suite_file, out, _ = bench_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/synth/baseline/*/cell.json")}
    records = run_suite(load_suite(str(suite_file)), out, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("done (skipped)") == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/synth/baseline/*/cell.json")} == before
    assert sum(r["status"] == "failed" for r in records) == 2  # failed cells are retried, and fail again


@pytest.mark.slow
def test_a_cell_scored_again_counts_its_training_not_its_scoring(bench_run, tmp_path):
    """A cell whose scoring failed after training is run again by the next `bench run`: it finds its
    training finished, and its train seconds stay the run's training time, not the re-scoring's."""
    import shutil

    suite_file, out, _ = bench_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    cdir = copy / "cells" / "synth" / "baseline" / "seed0"
    before = json.loads((cdir / "cell.json").read_text())
    import torch

    trained = torch.load(cdir / "run" / "checkpoint_last.pt", weights_only=True)["progress"]["seconds"]
    (cdir / "cell.json").write_text(json.dumps({**before, "status": "failed", "error": "scoring crashed"}))
    run_suite(load_suite(str(suite_file)), copy, progress=False)
    again = json.loads((cdir / "cell.json").read_text())
    assert again["status"] == "ok" and again["test"] == before["test"]
    result = json.loads((cdir / "run" / "result.json").read_text())  # what the second process's train() wrote
    assert trained > 0 and result["run_seconds"] == pytest.approx(trained + result["seconds"], abs=0.02)
    assert again["train_seconds"] == pytest.approx(result["run_seconds"], abs=0.1)
    assert again["train_wall_seconds"] >= result["seconds"] - 0.1


@pytest.mark.slow
def test_report_renders(bench_run):
    _, out, _ = bench_run
    md = report(out)
    assert "| baseline | clip:tiny (full) | 2 (+0 failed) |" in md or "| baseline | clip:tiny (full) | 2 |" in md
    assert "| broken | - | 0 (2 failed) |" in md
    assert "## Failed cells" in md and "synth/broken/seed0" in md
    assert "RemoteCLIP" in md  # published UCM rows printed beside ours
    from rsitr.bench.release import git_commit

    assert f"Code the finished cells ran: {git_commit() or 'not recorded'} (2 cells)." in md  # each number names its code
    assert (out / "report.json").is_file() and (out / "report.md").read_text() == md
    rows = {r["method"]: r for r in summarize(collect(out))}
    ms = [c["test"]["mR"] for c in collect(out) if c["method"] == "baseline"]
    assert rows["baseline"]["mR"] == pytest.approx(sum(ms) / 2)
    opt = [c["test_ties"]["optimistic"]["mR"] for c in collect(out) if c["method"] == "baseline"]
    assert rows["baseline"]["ties_optimistic"]["mR"][0] == pytest.approx(sum(opt) / 2)
    assert "Tied scores" in md and "| baseline | 2 | " in md
    pytest.importorskip("matplotlib")
    assert (out / "mr_vs_params.png").stat().st_size > 1000 and "![training_curves](training_curves.png)" in md


def test_suite_errors(tmp_path):
    with pytest.raises(RsitrError, match="no suite"):
        load_suite("nope")
    f = tmp_path / "s.yaml"
    f.write_text("name: x\ndatasets: {d: {data.path: /no/such/dir}}\nmethods: {b: {method.name: baseline}}\n")
    with pytest.raises(RsitrError, match="data.path '/no/such/dir'"):
        run_suite(load_suite(str(f)), tmp_path / "out")
    f.write_text("name: x\ndatasets: {d: {data.path: '${RSITR_TEST_UNSET_VAR}'}}\nmethods: {b: {}}\n")
    with pytest.raises(RsitrError, match="RSITR_TEST_UNSET_VAR"):
        load_suite(str(f))
    assert main(["bench", "run", "--suite", str(f), "--out", str(tmp_path / "o")]) == 2
    # a method option out of its range, or an unknown one: every cell's settings are read before any runs
    (tmp_path / "data").mkdir()
    for opts, msg in (("{vea_bottleneck: 0}", "RDB option vea_bottleneck must be >= 1"), ("{vea_bottlenek: 8}", "unknown RDB option")):
        f.write_text(f"name: x\ndatasets: {{d: {{data.path: {tmp_path / 'data'}}}}}\n"
                     f"methods: {{b: {{method.name: baseline}}, r: {{method.name: rdb, method.options: {opts}}}}}\nseeds: [0, 1]\n")
        with pytest.raises(RsitrError, match=msg) as info:
            run_suite(load_suite(str(f)), tmp_path / "out2")
        assert "d/r/seed0, d/r/seed1" in str(info.value) and "d/b/" not in str(info.value)
        assert not list((tmp_path / "out2").glob("cells/*/*/seed*/cell.json"))


def test_shipped_suites_parse_and_published_table(tmp_path):
    for name in ("synthetic-quick", "ucm-towers"):
        s = load_suite(name)
        assert s.cells and all(c.overrides.get("model.backbone") for c in s.cells)
    # a method's own ``seeds`` limits its cells unless the command line sets the seeds
    f = tmp_path / "seeds.yaml"
    f.write_text("name: s\ndatasets: {d: {data.path: x}}\nmethods: {a: {method.name: baseline}, b: {method.name: rdb, seeds: [0]}}\nseeds: [0, 1, 2]\n")
    s = load_suite(str(f))
    assert sorted(c.seed for c in s.cells if c.method == "b") == [0]
    assert sorted(c.seed for c in s.cells if c.method == "a") == [0, 1, 2]
    assert all("seeds" not in c.overrides for c in s.cells)
    assert sorted(c.seed for c in load_suite(str(f), seeds=[4, 5]).cells if c.method == "b") == [4, 5]
    # the real-data ViT-B/32 suites name every path they need, all at once
    for name, var in (("ucm-vitb32", "RSITR_UCM"), ("rsitmd-vitb32", "RSITR_RSITMD"), ("rsicd-vitb32", "RSITR_RSICD")):
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("RSITR_VITB32", raising=False)
            mp.delenv(var, raising=False)
            with pytest.raises(RsitrError, match=f"RSITR_VITB32, {var}|{var}, RSITR_VITB32"):
                load_suite(name)
            mp.setenv("RSITR_VITB32", "/no/such/ViT-B-32.pt")
            mp.setenv(var, "/no/such/dataset")
            s = load_suite(name)
            assert {c.method for c in s.cells} == {"baseline", "rdb", "iebaker", "ftf", "combo"}
            assert all(c.overrides["model.backbone"] == "/no/such/ViT-B-32.pt" for c in s.cells)
            with pytest.raises(RsitrError) as err:
                run_suite(s, tmp_path / name)
            assert "/no/such/dataset" in str(err.value) and "/no/such/ViT-B-32.pt" in str(err.value)
    rows = published_rows("UCM")
    best = max(rows, key=lambda r: float(r["mR"]))
    assert best["method"] == "RemoteCLIP" and float(best["mR"]) == pytest.approx(56.36)
    assert all(r["source"] for r in rows)
    json.dumps(rows)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    f = tmp_path / "s.yaml"
    f.write_text("name: x\ndatasets: {d: {data.path: /no/such/dir}}\nmethods: {b: {method.name: baseline}}\n")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running `bench run` holds
        with pytest.raises(RsitrError, match="another `rsitr bench run`"):
            run_suite(load_suite(str(f)), out)
    # released: the run proceeds (and stops at the missing dataset)
    with pytest.raises(RsitrError, match="data.path"):
        run_suite(load_suite(str(f)), out)


_STOP_SCRIPT = r"""
import json, os, pathlib, subprocess, sys
import rsitr.bench.suite as S

cdir = pathlib.Path(sys.argv[1])
(cdir / "spec.json").write_text(json.dumps({k: "x" for k in ("cell", "dataset", "method", "seed", "published")}))
real = subprocess.Popen

# the cell's process: its real entry point with the real command line, whose training is replaced by a
# wait; its pid is written once its options are read (so once it has asked to die with its parent)
CHILD = '''
import os, sys, time
import rsitr.bench.cell as C
def run(cell_dir, progress=True):
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(120)
C.run = run
sys.exit(C.main(sys.argv[2:]))
'''

def popen(cmd, **kw):
    i = cmd.index("rsitr.bench.cell")
    return real([sys.executable, "-c", CHILD, str(cdir / "child.pid")] + cmd[i + 1:], **kw)

S.subprocess.Popen = popen
# a fork() runs the atfork handlers of every library loaded here, gRPC's among them (pymilvus, Ray), and
# those can crash the child while gRPC's threads are busy: the cell must start without them (vfork)
os.register_at_fork(before=lambda: (cdir / "forked").write_text("atfork handlers ran"))
with S._terminate_as_exit():
    S._run_cell_process(cdir, progress=False, timeout=None)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_run_stops_its_cell(tmp_path, sig):
    """Stopping `bench run` (kill, or even kill -9) must not leave the cell training on after the
    folder's lock is released."""
    import signal
    import subprocess
    import time

    script = tmp_path / "run.py"
    script.write_text(_STOP_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    pid_file = tmp_path / "child.pid"
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(getattr(signal, sig))
    rc = parent.wait(timeout=30)
    assert rc == (143 if sig == "SIGTERM" else -9)
    assert not (tmp_path / "forked").exists(), "the cell's process was started by fork(), running the parent's atfork handlers"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:  # gone, or a zombie waiting for a reaper that may not exist in a container
            if open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the cell's process {child} outlived `bench run` ({sig})")


@pytest.mark.slow
def test_add_ties_backfills_a_finished_cell(bench_run):
    """`python -m rsitr.bench.cell CELL --add-ties` re-scores a finished cell run before the records
    carried every tie convention, and gives what the cell would have recorded."""
    import subprocess

    _, out, _ = bench_run
    cdir = out / "cells" / "synth" / "baseline" / "seed1"
    rec = json.loads((cdir / "cell.json").read_text())
    want = rec.pop("test_ties")
    (cdir / "cell.json").write_text(json.dumps(rec))
    proc = subprocess.run([sys.executable, "-m", "rsitr.bench.cell", str(cdir), "--add-ties"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((cdir / "cell.json").read_text())["test_ties"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {t: round(m["mR"], 2) for t, m in got.items()}
    for t in want:
        assert got[t] == pytest.approx(want[t], abs=1e-6)
    assert json.loads((cdir / "result.json").read_text())["test_ties"] == got
    bad = subprocess.run([sys.executable, "-m", "rsitr.bench.cell", str(out / "nope"), "--add-ties"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not a bench cell folder" in bad.stderr


def test_report_lists_methods_in_suite_order(tmp_path):
    from rsitr.bench.report import _suite_order

    (tmp_path / "suite.yaml").write_text("name: x\ndatasets: {d: {}}\nmethods: {zeta: {}, alpha: {}}\n")
    recs = [{"dataset": "d", "method": m, "seed": s} for m, s in (("alpha", 1), ("extra", 0), ("zeta", 1), ("alpha", 0), ("zeta", 0))]
    got = [(r["method"], r["seed"]) for r in _suite_order(tmp_path, recs)]
    assert got == [("zeta", 0), ("zeta", 1), ("alpha", 0), ("alpha", 1), ("extra", 0)]
    (tmp_path / "suite.yaml").write_text(": not yaml [")
    assert [r["method"] for r in _suite_order(tmp_path, recs)] == ["alpha", "alpha", "extra", "zeta", "zeta"]


ABLATIONS = """
name: ablations
base:
  model.backbone: clip:tiny
  model.mode: full
  epochs: 1
  max_steps: 2
  batch_size: 8
  warmup_steps: 1
  eval_batch_size: 64
  augment.enabled: false
datasets:
  noisy:
    synth: {images: 24, seed: 5, noise_frac: 0.3}
options:
  iebaker: {eba_fraction: 0.25, eba_warmup_epochs: 0}
  lora: {rank: 2}
methods:
  zero-shot: {method.name: baseline, train: false}
  lora: {method.name: lora, model.mode: frozen}
  +EBA: {method.name: iebaker, method.options: {eba: true}}
measurements:
  params: {}
  eba_filter: {fractions: [0.25]}
  ftf_speed: {ks: [2], queries: 5, exhaustive_queries: 2}
seeds: [0]
"""


@pytest.mark.slow
def test_ablations_and_measurements_run_as_one_suite(tmp_path, capsys):
    """RDB-comparison rows (a zero-shot row, a PEFT row) and an iEBAKER ablation row run as cells of
    one suite; their parameter budget, the EBA filter's precision/recall and the FTF speed
    measurement are recorded by the cells and rendered by the one report."""
    f = tmp_path / "ablations.yaml"
    f.write_text(ABLATIONS)
    out = tmp_path / "run"
    assert main(["-q", "bench", "run", "--suite", str(f), "--out", str(out)]) == 0
    recs = {r["method"]: r for r in collect(out)}
    assert set(recs) == {"zero-shot", "lora", "+EBA"} and all(r["status"] == "ok" for r in recs.values())
    zs, lora, eba = recs["zero-shot"]["measurements"], recs["lora"]["measurements"], recs["+EBA"]["measurements"]
    assert zs["params"]["trainable_params"] == 0 and zs["params"]["added_params"] == 0 and recs["zero-shot"]["history"] == []
    assert lora["params"]["added_params"] == lora["params"]["trainable_params"] == 8 * 3 * 2 * (2 * 128) and lora["params"]["steps"] == 2
    assert "eba_filter" not in zs and "eba_filter" not in lora  # the EBA filter applies to EBA cells only
    q = eba["eba_filter"]
    assert [e["epoch"] for e in q["eba_epochs"]] == [1] and 0 <= q["eba_precision"] <= 1 and 0 <= q["eba_recall"] <= 1
    assert q["eba_noisy"] > 0 and 0 <= q["noise_auc"] <= 1 and set(q["noise_curve"]) == {"0.25"}
    ftf = lora["ftf_speed"]
    assert [r["stage"] for r in ftf["rows"]] == ["coarse", "two-stage K=2", "exhaustive"] and ftf["setup"]["recall_meaningful"]
    assert [r["queries"] for r in ftf["rows"]] == [5, 5, 2]
    md = (out / "report.md").read_text()
    for section in ("### Parameters and budget (`params`)", "### EBA filter quality (`eba_filter`)",
                    "### FTF: coarse vs two-stage vs exhaustive scoring (`ftf_speed`)"):
        assert section in md
    assert f"| +EBA | {100 * q['eba_precision']:.1f} | {100 * q['eba_recall']:.1f} |" in md
    assert "| lora | frozen | 12.29K |" in md and "FTF text->image" in md
    report_rows = json.loads((out / "report.json").read_text())["rows"]
    assert next(r for r in report_rows if r["method"] == "+EBA")["measurements"]["eba_filter"]["result"]["eba_recall"] == pytest.approx(q["eba_recall"])


def test_measurements_summarize_over_seeds_and_render_failures():
    from rsitr.bench.measurements import get_measurement, list_measurements, mean_results

    assert {"params", "eba_filter", "ftf_speed", "vector_search", "index_build", "encode"} <= set(list_measurements())
    with pytest.raises(RsitrError, match="no measurement 'nope'"):
        get_measurement("nope")
    test = dict.fromkeys(("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR"), 10.0)

    def rec(seed, meas):
        return {"dataset": "d", "method": "rdb", "seed": seed, "status": "ok", "test": test, "trainable_params": 1500, "mode": "heads",
                "measurements": meas}

    recs = [rec(s, {"params": {"trainable_params": 1500, "total_params": 10000, "trainable_pct": 15.0, "added_params": 1500, "steps": 10 + 2 * s,
                               "train_seconds": 3.0}}) for s in (0, 1)]
    recs.append(rec(2, {"params": {"error": "RsitrError: boom"}}))
    row = summarize(recs)[0]
    params = row["measurements"]["params"]
    assert params["seeds"] == 2 and params["failed"] == 1 and params["error"] == "RsitrError: boom"
    assert params["result"]["steps"] == pytest.approx(11.0) and params["result_std"]["steps"] == pytest.approx(2 ** 0.5)
    assert params["result"]["trainable_params"] == 1500  # a count every seed shares stays an integer
    md = "\n".join(render_measurements([row]))
    assert "| rdb | heads | 1.50K | 15.000 ± 0.000 | 1.50K | 11 ± 1 | 3 ± 0 |" in md
    assert "- rdb: 1 cell(s) failed this measurement: RsitrError: boom" in md
    # nested results (a table per seed) average row by row; names and settings from the first
    got = mean_results([{"rows": [{"stage": "coarse", "p50_ms": 1.0}], "index": "flat"}, {"rows": [{"stage": "coarse", "p50_ms": 3.0}], "index": "flat"}])
    assert got == {"rows": [{"stage": "coarse", "p50_ms": 2.0}], "index": "flat"}
    assert mean_results([{"x": float("nan")}, {"x": None}]) == {"x": None}


def test_suite_options_merge_and_unknown_measurements(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\nbase: {method.options: {a: 1}}\ndatasets: {d: {data.path: x}}\noptions: {iebaker: {a: 2, b: 2}}\n"
                 "methods: {m: {method.name: iebaker, method.options: {b: 3}}, n: {method.name: baseline}}\nmeasurements: [params]\n")
    s = load_suite(str(f))
    opts = {c.method: c.overrides["method.options"] for c in s.cells}
    assert opts == {"m": {"a": 2, "b": 3}, "n": {"a": 1}} and s.measurements == {"params": {}}
    f.write_text("name: s\ndatasets: {d: {data.path: x}}\nmethods: {m: {method.name: baseline}}\nmeasurements: [nope]\n")
    with pytest.raises(RsitrError, match="no measurement 'nope'"):
        load_suite(str(f))
    for name in ("rdb-comparison", "iebaker-ablation"):
        assert load_suite(name).measurements
    # a declared measurement's parameters are checked when the suite is read, before any cell
    for spec, msg in (("{test_time: {tta: 3}}", "tta must be 4 or 8"), ("{params: {x: 1}}", "unknown parameter"),
                      ("{ftf_speed: {queries: -5}}", "queries must be a whole number"), ("{vector_search: {sizes: []}}", "sizes must be"),
                      ("{encode: {batch_size: .nan}}", "batch_size must be"), ("{eba_filter: {fractions: [2]}}", "fractions must be in"),
                      ("{test_time: [1, 2]}", "must be a mapping")):
        f.write_text(f"name: s\ndatasets: {{d: {{data.path: x}}}}\nmethods: {{m: {{method.name: baseline}}}}\nmeasurements: {spec}\n")
        with pytest.raises(RsitrError, match=msg):
            load_suite(str(f))


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**7), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=5), st.lists(st.one_of(st.integers(-2, 50), st.floats(allow_nan=True), st.text(max_size=2)), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["params", "eba_filter", "ftf_speed", "vector_search", "index_build", "encode", "test_time"]),
       params=st.dictionaries(st.sampled_from(["tta", "beta", "fractions", "queries", "ks", "sizes", "n_tiles", "batch_size", "nprobe",
                                               "reference", "kinds", "seed", "alpha", "bogus", "dim", "checkpoint"]), _VALUES, max_size=3))
def test_measurement_parameters_are_checked_in_one_line(name, params):
    """Every measurement's parameters, generated: accepted, or one RsitrError naming the
    parameter -- never another exception; a name the measurement does not take is always refused,
    and so is a value of another kind than its default's."""
    from rsitr.bench.measurements import check_params, get_measurement

    try:
        checked = check_params(name, params)
    except RsitrError as exc:
        assert str(exc).startswith(name + ":") and "\n" not in str(exc)
        return
    assert checked == params
    m = get_measurement(name)
    if name in ("params",):
        assert not params
    for key, value in params.items():
        assert key not in ("bogus", "checkpoint", "dim")  # taken by none on a cell (the cell gives them)
        if key in ("queries", "n_tiles", "batch_size", "nprobe", "seed") and value is not None:
            assert isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key == "seed" else 1)
        if key in ("ks", "sizes") and value is not None:
            assert value and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)
        if key in ("alpha",) and value is not None:
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    assert m.check is not None


SET_SUITE = """
name: setme
base:
  model:
    backbone: clip:tiny
    mode: full
  epochs: 3
datasets:
  synth:
    synth: {images: 20, seed: 1}
methods:
  baseline: {method.name: baseline}
  short: {method.name: baseline, epochs: 1}
seeds: [0]
"""


def test_set_goes_over_the_base_and_is_archived(tmp_path):
    """``bench run --set``: over the suite's base (nested or dotted), under a method's own keys;
    the archived suite says so; an unknown key fails before any cell."""
    f = tmp_path / "s.yaml"
    f.write_text(SET_SUITE)
    suite = load_suite(str(f), sets={"model.mode": "top:1,3", "epochs": 5, "lr": 0.002})
    cells = {c.method: c.overrides for c in suite.cells}
    assert cells["baseline"]["model.mode"] == "top:1,3" and cells["baseline"]["model.backbone"] == "clip:tiny"
    assert cells["baseline"]["epochs"] == 5 and cells["short"]["epochs"] == 1  # the method's own key wins
    assert cells["short"]["lr"] == 0.002
    assert suite.text.startswith("# s.yaml run with --set model.mode=top:1,3 epochs=5 lr=0.002")
    import yaml

    assert yaml.safe_load(suite.text)["base"]["model.mode"] == "top:1,3"
    assert {c.method: c.overrides for c in load_suite(str(f)).cells}["baseline"]["model.mode"] == "full"  # file untouched
    with pytest.raises(RsitrError, match="unknown config key: modle.mode"):
        load_suite(str(f), sets={"modle.mode": "full"})
    assert main(["bench", "run", "--suite", str(f), "--out", str(tmp_path / "o"), "--set", "modle.mode=full"]) == 2
    with pytest.raises(RsitrError, match="expected int"):
        load_suite(str(f), sets={"epochs": "many"})
    assert not (tmp_path / "o").exists()
    # a teacher that is not there (a path, a folder without checkpoints): named before any cell runs
    (tmp_path / "empty-run").mkdir()
    for teachers in (f"[{tmp_path / 'nope'}]", str(tmp_path / "empty-run")):
        assert main(["bench", "run", "--suite", str(f), "--out", str(tmp_path / "o"), "--set", f"distill.teachers={teachers}"]) == 2
        assert not list((tmp_path / "o").glob("cells/*/*/seed*/cell.json"))


def _finish_fake(out, suite):
    """Every cell of ``suite`` marked finished in ``out`` with the settings it has now (as a run
    records them: the synthetic dataset generated and pointed at)."""
    from rsitr.bench.suite import prepare_synthetic

    prepare_synthetic(suite, out)
    for c in suite.cells:
        cdir = out / "cells" / c.dataset / c.method / f"seed{c.seed}"
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "spec.json").write_text(json.dumps({"cell": c.key, "overrides": {"cache_dir": str(out / "cache"), **c.overrides,
                                                                                   "out_dir": str(cdir / "run")}}))
        (cdir / "cell.json").write_text(json.dumps({"cell": c.key, "dataset": c.dataset, "method": c.method, "seed": c.seed,
                                                    "status": "ok", "test": {"mR": 1.0}}))


def test_finished_cells_with_other_settings_are_refused(tmp_path):
    """A finished cell is skipped on a second run; with other settings now (an edited suite, a
    --set) skipping it would mix two recipes in one report: refused before anything runs, every
    changed key named; moved paths and failed cells do not count. Generated setting changes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    f = tmp_path / "s.yaml"
    f.write_text(SET_SUITE)
    out = tmp_path / "out"
    _finish_fake(out, load_suite(str(f)))
    # unchanged: every cell skipped
    assert [r["status"] for r in run_suite(load_suite(str(f)), out, progress=False)] == ["ok", "ok"]
    archived = (out / "suite.yaml").read_text()
    with pytest.raises(RsitrError, match="other settings"):
        run_suite(load_suite(str(f), sets={"epochs": 9}), out, progress=False)
    assert (out / "suite.yaml").read_text() == archived  # a refused run leaves the folder's record as it was

    pairs = st.one_of(st.tuples(st.just("model.mode"), st.sampled_from(["full", "top:1,3"])), st.tuples(st.just("epochs"), st.integers(1, 5)),
                      st.tuples(st.just("lr"), st.sampled_from([0.001, 0.002])), st.tuples(st.just("batch_size"), st.sampled_from([8, 16])),
                      st.tuples(st.sampled_from(["cache_dir", "data.path"]), st.just(str(tmp_path / "elsewhere"))))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(pairs, min_size=1, max_size=4))
    def check(sets):
        suite = load_suite(str(f), sets=dict(sets))
        before = {c.key: c.overrides for c in load_suite(str(f)).cells}
        changed = {c.key: sorted(k for k in set(c.overrides) | set(before[c.key])
                                 if k not in ("cache_dir", "data.path", "out_dir") and c.overrides.get(k) != before[c.key].get(k))
                   for c in suite.cells}
        if any(changed.values()):
            with pytest.raises(RsitrError, match="other settings") as exc:
                run_suite(suite, out, progress=False)
            for key, ks in changed.items():
                assert (key in str(exc.value)) == bool(ks)
                for k in ks:
                    assert f"{k}:" in str(exc.value)
        else:
            assert [r["status"] for r in run_suite(suite, out, progress=False)] == ["ok", "ok"]

    check()
    # a failed cell runs again with the new settings: not a reason to refuse
    rec = out / "cells" / "synth" / "baseline" / "seed0" / "cell.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "status": "failed"}))
    changed = load_suite(str(f), sets={"epochs": 7})  # changes the baseline cell only (short keeps its 1)
    import rsitr.bench.suite as S

    ran = []
    real = S._run_cell_process
    S._run_cell_process = lambda cdir, **kw: ran.append(cdir) or {"status": "ok", "test": {"mR": 2.0}}
    try:
        run_suite(changed, out, progress=False)
    finally:
        S._run_cell_process = real
    assert [p.parent.name for p in ran] == ["baseline"]


# the tiny suite with one method and one seed
TT_SUITE = SUITE.replace("  broken: {method.name: baseline, model.mode: no-such-mode}\n", "").replace("seeds: [0, 1]", "seeds: [0]")


@pytest.mark.slow
def test_test_time_measurement_declared_and_added_later(tmp_path, capsys, monkeypatch):
    """``test_time`` (TTA + QB-Norm, alone and together) on a cell: declared in the suite it runs
    with the cell; ``rsitr bench measure`` adds it to a cell that ran without it, with the same
    numbers as ``rsitr models evaluate``'s function; bad parameters are refused in one line before
    any cell is loaded (exit 2); a measurement failing on a cell is recorded (exit 1) but never
    replaces a result the cell had."""
    from rsitr.bench.release import EvalSet, evaluate_model

    f = tmp_path / "tt.yaml"
    f.write_text(TT_SUITE)
    out = tmp_path / "run"
    run_suite(load_suite(str(f)), out, progress=False)
    cdir = out / "cells" / "synth" / "baseline" / "seed0"
    rec = json.loads((cdir / "cell.json").read_text())
    assert "measurements" not in rec
    assert main(["-q", "bench", "measure", str(out), "test_time"]) == 0
    rec = json.loads((cdir / "cell.json").read_text())
    tt = rec["measurements"]["test_time"]
    assert tt["tta_views"] == 8 and tt["beta"] == 14.0 and tt["bank"] == "train"
    assert tt["plain"] == pytest.approx(rec["test"]["mR"], abs=1e-6)  # the embedding scores of the cell's own test row
    data = str(out / "data" / "synth" / "dataset_synth.json")
    rows = evaluate_model(str(cdir / "run"), [EvalSet("s", data)], ttas=(1, 8), progress=False)
    want = {("plain" if r["tta"] == 1 else "tta") if r["rerank"] == "none" else ("qbnorm" if r["tta"] == 1 else "both"): r["mR"] for r in rows}
    assert {k: tt[k] for k in want} == pytest.approx(want, abs=1e-9) and len(want) == 4
    assert json.loads((cdir / "result.json").read_text())["measurements"]["test_time"] == tt
    md = (out / "report.md").read_text()
    assert "### Test-time views and QB-Norm (`test_time`)" in md and "| baseline | full | 1 |" in md
    # a second call keeps what it has; bad parameters: one line, exit 2, before any cell is loaded,
    # even with --again on cells that have the measurement; their result stays
    capsys.readouterr()
    assert main(["-q", "bench", "measure", str(out), "test_time"]) == 0 and "has test_time" in capsys.readouterr().out
    for bad, msg in (("tta=3", "tta must be 4 or 8"), ("tta=abc", "tta must be 4 or 8"), ("tta=8.5", "tta must be 4 or 8"),
                     ("tta=1", "tta must be 4 or 8"), ("tta=true", "tta must be 4 or 8"),
                     ("beta=-1", "beta must be a positive number"), ("beta=.nan", "beta must be a positive number"),
                     ("beta=.inf", "beta must be a positive number"), ("beta=high", "beta must be a positive number"),
                     ("beta=0", "beta must be a positive number"), ("views=8", "unknown parameter")):
        for again in ([], ["--again"]):
            assert main(["-q", "bench", "measure", str(out), "test_time", *again, "--set", bad]) == 2
            err = capsys.readouterr().err
            assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
            assert json.loads((cdir / "cell.json").read_text())["measurements"]["test_time"] == tt
    # a measurement that fails on the cell (after its parameters passed): exit 1, recorded only
    # where the cell had no result of it -- a failed --again never replaces a result
    import rsitr.bench.testtime as testtime

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(testtime, "measure", broken)
    assert main(["-q", "bench", "measure", str(out), "test_time", "--again"]) == 1
    rec = json.loads((cdir / "cell.json").read_text())
    assert rec["status"] == "ok" and rec["measurements"]["test_time"] == tt
    assert json.loads((cdir / "result.json").read_text())["measurements"]["test_time"] == tt
    for name in ("cell.json", "result.json"):
        r = json.loads((cdir / name).read_text())
        r["measurements"].pop("test_time")
        (cdir / name).write_text(json.dumps(r))
    assert main(["-q", "bench", "measure", str(out), "test_time"]) == 1
    assert "disk on fire" in json.loads((cdir / "cell.json").read_text())["measurements"]["test_time"]["error"]
    monkeypatch.undo()
    assert main(["-q", "bench", "measure", str(out), "test_time"]) == 0  # an error is measured again without --again
    assert json.loads((cdir / "cell.json").read_text())["measurements"]["test_time"] == tt
    assert main(["-q", "bench", "measure", str(out), "no_such_measurement"]) == 2
    assert main(["-q", "bench", "measure", str(out), "test_time", "--methods", "nope"]) == 2
    assert main(["-q", "bench", "measure", str(tmp_path), "test_time"]) == 2
    # a folder whose cells all failed: said, not a silent success
    rec = json.loads((cdir / "cell.json").read_text())
    (cdir / "cell.json").write_text(json.dumps({**rec, "status": "failed"}))
    capsys.readouterr()
    assert main(["-q", "bench", "measure", str(out), "test_time"]) == 2 and "no finished cell to measure" in capsys.readouterr().err
    (cdir / "cell.json").write_text(json.dumps(rec))
    # declared in the suite: measured with the cell (tta 4 here)
    f.write_text(TT_SUITE + "measurements: {test_time: {tta: 4}}\n")
    run_suite(load_suite(str(f)), tmp_path / "run2", progress=False)
    tt2 = json.loads((tmp_path / "run2" / "cells" / "synth" / "baseline" / "seed0" / "cell.json").read_text())["measurements"]["test_time"]
    assert tt2["tta_views"] == 4 and set(tt2) >= {"plain", "tta", "qbnorm", "both"}


def test_test_time_on_a_mix_of_datasets_has_a_column_group_each():
    """A cell trained on several datasets (data.sources): each is scored on its own test split with
    its own training captions as the bank, and the report has four columns per dataset."""
    from rsitr.bench.testtime import TEST_TIME, _eval_sets
    from rsitr.train.config import TrainConfig

    cfg = TrainConfig().override({"data.sources": [{"path": "/a/ucm", "name": "ucm"}, {"path": "/b/rsicd", "name": "rsicd", "format": "karpathy"}]})
    sets = _eval_sets(cfg)
    assert [(s.label, s.data, s.split, s.bank, s.format) for s in sets] == [("ucm", "/a/ucm", "test", "train", "auto"),
                                                                            ("rsicd", "/b/rsicd", "test", "train", "karpathy")]
    res = {"tta_views": 8, "beta": 14.0, "bank": "train", **{f"{d}:{k}": v for d, base in (("ucm", 50.0), ("rsicd", 22.0))
                                                              for k, v in zip(("plain", "tta", "qbnorm", "both"), (base, base + 1, base + 2, base + 3))}}
    lines = TEST_TIME.render([{"method": "baseline", "mode": "top:1,3", "seeds": 2, "result": res,
                               "result_std": {"ucm:plain": 0.5, "rsicd:both": 0.25}}])
    assert "| ucm:plain | ucm:TTA 8 | ucm:QB-Norm | ucm:both | rsicd:plain |" in lines[2]
    assert lines[-1] == "| baseline | top:1,3 | 2 | 50.00 ± 0.50 | 51.00 ± 0.00 | 52.00 ± 0.00 | 53.00 ± 0.00 | 22.00 ± 0.00 | 23.00 ± 0.00 | 24.00 ± 0.00 | 25.00 ± 0.25 |"


@pytest.mark.slow
def test_a_cell_runs_with_the_runs_threads_and_pixel_limit(tmp_path):
    """`rsitr --threads 1 --max-pixels N bench run`: the cells' own processes use one thread and that
    limit too (they ran with torch's default, every core, so two runs "at one thread each" were
    four threads on two cores)."""
    import torch

    from rsitr.data.images import max_pixels, set_max_pixels

    f = tmp_path / "tt.yaml"
    f.write_text(TT_SUITE)
    before_t, before_p = torch.get_num_threads(), max_pixels()
    want_t = 1 if before_t != 1 else 2
    torch.set_num_threads(want_t)
    set_max_pixels(12_345_678)
    try:
        (rec,) = run_suite(load_suite(str(f)), tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(before_t)
        set_max_pixels(before_p)
    assert rec["status"] == "ok"
    assert rec["environment"]["threads"] == want_t and rec["environment"]["max_pixels"] == 12_345_678


def test_a_cell_whose_run_has_stopped_does_not_start(tmp_path):
    """A cell started for a `bench run` that died before the cell asked for its death signal sees
    another parent: it stops at once, one line, and writes nothing."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "rsitr.bench.cell", str(tmp_path), "--parent", "999999999"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is not this process's parent" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,msg", [
    ([], "no cell folder given"), (["a", "b"], "unexpected argument 'b'"), (["a", "--threads"], "--threads needs a whole number"),
    (["a", "--threads", "0"], "--threads needs a whole number"), (["a", "--max-pixels", "x"], "--max-pixels needs a whole number"),
    (["a", "--nope"], "unexpected argument '--nope'"), (["a", "--parent", "-3"], "--parent needs a whole number"),
])
def test_the_cell_processs_command_line_errors_are_one_line(argv, msg, capsys):
    from rsitr.bench.cell import _parse, main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert _parse(["d", "--quiet", "--threads", "1", "--max-pixels", "99", "--add-ties", "--parent", "7"]) == {
        "cell_dir": __import__("pathlib").Path("d"), "quiet": True, "add_ties": True, "threads": 1, "max_pixels": 99, "parent": 7}
