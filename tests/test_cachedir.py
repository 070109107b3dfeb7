"""Cache folders (rsitr.utils.cachedir, ``rsitr cache ls|prune``): every trunk cache is described
beside it, loads mark an item used, prune removes what was not used for N days and nothing else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import fake_trunks

from rsitr.cli import main
from rsitr.data.captions import load_dataset
from rsitr.models.trunk_cache import build_trunk_cache
from rsitr.data.transforms import EvalTransform
from rsitr.utils.cachedir import dead_temporaries, prune, render, scan

DAY = 86400.0


@pytest.fixture(scope="module")
def synth(synth_dataset):
    return synth_dataset(n_images=12, seed=5, image_size=32)


def _build(bb, synth, cache):
    ds = load_dataset(synth).split("train")
    return build_trunk_cache(bb, ds, cache_dir=cache, eval_transform=EvalTransform(bb.preprocess), batch_size=4, progress=False), ds


def _age(path, days):
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def test_trunk_caches_are_described_and_loads_mark_them_used(synth, tmp_path):
    cache = tmp_path / "cache"
    _, ds = _build(fake_trunks(), synth, cache)
    items = scan(cache)
    assert sorted(it.path.name[:3] for it in items) == ["img", "txt"]
    for it in items:
        d = it.description
        assert d["what"] == {"img": "image", "txt": "text"}[it.path.name[:3]] and d["backbone"] == fake_trunks().info.name
        assert d["entries"] == len(ds) and d["captions"] == sum(len(e.captions) for e in ds.entries) and d["splits"] == ["train"]
        assert it.size == it.path.stat().st_size + it.sidecar.stat().st_size
        assert d["what"] in it.summary() and str(len(ds)) in it.summary()
    for it in items:
        _age(it.path, 40)
    again = fake_trunks()
    _build(again, synth, cache)
    assert again.calls == 0  # loaded ...
    assert all(time.time() - it.last_used < 60 for it in scan(cache))  # ... and marked used


def _populate(folder):
    """Two old items (one with a description), one fresh, foreign files and temporaries."""
    folder.mkdir()
    old_img, old_graph, fresh = folder / ("img-" + "a" * 20 + ".pt"), folder / ("text_trunk-" + "b" * 24 + ".onnx"), folder / ("txt-" + "c" * 20 + ".pt")
    for p in (old_img, old_graph, fresh):
        p.write_bytes(b"x" * 1000)
    old_graph.with_suffix(".json").write_text(json.dumps({"part": "text_trunk", "backbone": "tiny", "torch": "2.13.0", "exact": True}))
    # not cache items: a user's file, a name without a key, a checkpoint -- never touched
    foreign = [folder / "notes.txt", folder / "img-notahexkey.pt", folder / "checkpoint_best.pt"]
    for p in foreign:
        p.write_bytes(b"keep")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    dead_tmp = folder / f".{old_img.name}.{dead_pid}.k3j_x.tmp"
    live_tmp = folder / f".{fresh.name}.{os.getpid()}.a1b2.tmp"
    foreign_tmp = folder / f".notes.txt.{dead_pid}.zz.tmp"
    for p in (dead_tmp, live_tmp, foreign_tmp):
        p.write_bytes(b"t" * 10)
    for p in (old_img, old_graph):
        _age(p, 40)
    _age(fresh, 1)
    return old_img, old_graph, fresh, foreign + [live_tmp, foreign_tmp], dead_tmp


def test_prune_removes_unused_items_and_dead_temporaries_only(tmp_path):
    folder = tmp_path / "c"
    old_img, old_graph, fresh, keep, dead_tmp = _populate(folder)
    items = scan(folder)
    assert [it.path for it in items][-1] == fresh  # least recently used first
    assert {it.kind for it in items} == {"trunk cache", "onnx graph"}
    assert dead_temporaries(folder) == [dead_tmp]
    table = render(folder, items)
    assert "tiny text_trunk, torch 2.13.0" in table and "(no description" in table and "3 items" in table
    before = sorted(p.name for p in folder.iterdir())
    dry = prune(folder, 30 * DAY, dry_run=True)
    assert sorted(p.name for p in folder.iterdir()) == before  # a dry run removes nothing
    assert {it.path for it in dry.removed} == {old_img, old_graph} and dry.temporaries == [dead_tmp]
    expected = 2 * 1000 + old_graph.with_suffix(".json").stat().st_size + 10  # two items, a description, the dead temporary
    r = prune(folder, 30 * DAY)
    assert r.freed == dry.freed == expected
    left = {p.name for p in folder.iterdir()}
    assert left == {fresh.name, *(p.name for p in keep)}  # the description of the pruned graph went with it
    assert [it.path for it in r.kept] == [fresh]
    assert prune(folder, 0).removed[0].path == fresh and not scan(folder)


def test_scan_of_a_missing_folder_is_empty_and_of_a_file_is_an_error(tmp_path):
    from rsitr.utils.errors import RsitrError

    assert scan(tmp_path / "nothing") == []
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(RsitrError, match="not a folder"):
        scan(f)
    with pytest.raises(RsitrError, match=">= 0"):
        prune(tmp_path, -1)


def test_cli_ls_and_prune(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "c"
    old_img, old_graph, fresh, keep, dead_tmp = _populate(folder)
    assert main(["cache", "ls", str(folder), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["file"] for i in listed[0]["items"]][-1] == fresh.name and listed[0]["bytes"] == sum(i["bytes"] for i in listed[0]["items"])
    assert main(["cache", "prune", str(folder)]) == 2
    assert "--unused-days" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # refused by the parser, in the flag's own unit (issue 29: every numeric option)
        main(["cache", "prune", str(folder), "--unused-days", "-1"])
    assert refused.value.code == 2 and "argument --unused-days: must be a number >= 0, got '-1'" in capsys.readouterr().err
    assert main(["cache", "prune", str(folder), "--unused-days", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {old_img}" in out and "temporary of a writer that died" in out and old_img.exists()
    assert main(["cache", "prune", str(folder), "--unused-days", "30", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert sorted(res["folders"][0]["removed"]) == sorted([str(old_img), str(old_graph)]) and not old_img.exists() and fresh.exists()
    # no folder: the ONNX graph cache ($RSITR_ONNX_CACHE)
    monkeypatch.setenv("RSITR_ONNX_CACHE", str(folder))
    assert main(["cache", "ls"]) == 0
    assert fresh.name in capsys.readouterr().out


def test_onnx_graph_loads_mark_it_used(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from rsitr.models.clip import CLIP
    from rsitr.models.engine import engine_for

    torch.manual_seed(0)
    model = CLIP.from_config("tiny").eval()
    engine_for(model, "onnx", cache_dir=tmp_path).describe()
    graphs = [it for it in scan(tmp_path) if it.kind == "onnx graph"]
    assert len(graphs) == 2 and all(it.description.get("exact") for it in graphs)
    for it in graphs:
        _age(it.path, 40)
    again = engine_for(model, "onnx", cache_dir=tmp_path)
    again.describe()
    assert again.export_seconds == 0.0 and all(time.time() - it.last_used < 60 for it in scan(tmp_path))
    assert not prune(tmp_path, 30 * DAY).removed


def test_atomic_writes_clear_only_their_own_dead_writers_temporaries(tmp_path):
    """The temporary-name parse the pruning shares with rsitr.utils.io.atomic_path: a write of a
    file removes its temporaries whose writer died, not a live writer's nor another file's."""
    from rsitr.utils.io import atomic_write_text, temporary_of

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    target = tmp_path / "a.pt"
    dead_tmp, live_tmp = tmp_path / f".a.pt.{dead}.x1_y.tmp", tmp_path / f".a.pt.{os.getpid()}.q9.tmp"
    other = tmp_path / f".a.pt.json.{dead}.zz.tmp"  # another file's temporary, though its glob matches
    for p in (dead_tmp, live_tmp, other):
        p.write_text("t")
    assert temporary_of(dead_tmp.name) == ("a.pt", dead) and temporary_of(other.name) == ("a.pt.json", dead)
    assert temporary_of("a.pt") is None and temporary_of(".a.pt.notapid.x.tmp") is None
    atomic_write_text(target, "done")
    assert target.read_text() == "done" and not dead_tmp.exists() and live_tmp.exists() and other.exists()
