"""kill -9 at the worst moments (issue 21): during a checkpoint write, during `rsitr index add`, and
while a server reads an index that `index add` is extending. Afterwards the last good checkpoint /
index is intact and readable, and the server never answers from a half-written index."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


# -- checkpoints -------------------------------------------------------------------------------
CKPT_WRITER = r"""
import sys, torch
from pathlib import Path
from rsitr.models.checkpoint import TrainCheckpoint
def save_checkpoint(path, state, step):
    TrainCheckpoint("clip:tiny", {}, {}, state, True, "baseline", progress={"global_step": step}).save(path)
out, marker, hang = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "hang"
if hang:  # step 2: torch.save writes part of the file, says so, and waits to be killed
    import rsitr.models.checkpoint as C
    real = torch.save
    def slow_save(obj, f):
        import io, time
        buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
            marker.write_text(str(f)); time.sleep(120)
            fh.write(data[len(data) // 2 :])
    import os
    C.torch.save = slow_save
for step in (1, 2) if hang else (1,):
    save_checkpoint(out, {"w": torch.full((256, 256), float(step))}, step)
    if not hang:
        marker.write_text("done")
"""


def test_kill_during_checkpoint_write_keeps_the_last_good_one(tmp_path):
    from rsitr.models.checkpoint import TrainCheckpoint

    ck = tmp_path / "checkpoint_last.pt"
    p = subprocess.run([sys.executable, "-c", CKPT_WRITER, str(ck), str(tmp_path / "m1"), "once"], env=ENV, timeout=120, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    proc = subprocess.Popen([sys.executable, "-c", CKPT_WRITER, str(ck), str(tmp_path / "m2"), "hang"], env=ENV, stderr=subprocess.PIPE, text=True)
    # the hanging writer saves step 1 again, then hangs half-way through step 2
    _wait_for(tmp_path / "m2", proc, 120)
    half = Path((tmp_path / "m2").read_text())
    assert half.exists() and half != ck and half.parent == ck.parent  # the bytes go to a temporary name
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    d = TrainCheckpoint.load(ck)
    assert d.global_step == 1 and float(d.state["w"].mean()) == 1.0
    # the killed write's temporary file is not mistaken for a checkpoint, and the next write of
    # that checkpoint removes it (its writer is gone)
    assert TrainCheckpoint.load(tmp_path).global_step == 1
    assert half.exists()
    d.save(ck)
    assert not half.exists() and not list(tmp_path.glob("*.tmp"))


def test_kill_during_training_resumes(tmp_path):
    """A real training run killed at random steps (checkpoint every step): the run folder always
    holds a readable checkpoint_last.pt, and --resume finishes the run."""
    from rsitr.data.synth import write_synth
    from rsitr.models.checkpoint import TrainCheckpoint

    write_synth(tmp_path / "data", n_images=40, seed=1, image_size=32)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "rsitr.cli", "-q", "train", "--data", str(tmp_path / "data" / "dataset_synth.json"), "--out", str(run),
            "--backbone", "clip:tiny", "--mode", "full", "--epochs", "3", "--set", "max_steps=10", "--set", "batch_size=8", "--set", "save_every_steps=1",
            "--set", "eval_every=0"]
    rng = np.random.default_rng(0)
    steps_seen = []
    for attempt in range(3):
        proc = subprocess.Popen(args + (["--resume"] if attempt else []), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        # wait until this attempt has written at least one checkpoint of its own, then kill at a random moment
        before = (run / "checkpoint_last.pt").stat().st_mtime_ns if (run / "checkpoint_last.pt").exists() else 0
        while proc.poll() is None and time.monotonic() - t0 < 300:
            if (run / "checkpoint_last.pt").exists() and (run / "checkpoint_last.pt").stat().st_mtime_ns != before:
                break
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        d = TrainCheckpoint.load(run / "checkpoint_last.pt")  # never half-written
        if d.global_step == 10:  # killed after its last step (max_steps=10) was saved: not a kill during training
            break
        steps_seen.append(d.global_step)
    p = subprocess.run(args + ["--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert steps_seen == sorted(steps_seen) and all(s >= 1 for s in steps_seen)
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == result["planned_steps"] > max(steps_seen)
    assert TrainCheckpoint.load(run / "checkpoint_last.pt").global_step == result["planned_steps"]


# -- indexes -----------------------------------------------------------------------------------
def _tiles(folder: Path, n: int, start: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"tile_{i:05d}.png")
    return folder


def _check_index(idx: Path, counts: set[int]) -> int:
    from rsitr.search.engine import SearchEngine

    eng = SearchEngine(idx, load_model=False)
    assert len(eng) in counts, (len(eng), counts)
    assert eng.embeddings.shape[0] == len(eng) == eng.vectors.ntotal if hasattr(eng.vectors, "ntotal") else True
    ids = [it.id for it in eng.items]
    assert ids == list(range(len(eng)))
    return len(eng)


@pytest.fixture(scope="module")
def base_index(tmp_path_factory):
    from rsitr.search import build as B

    root = tmp_path_factory.mktemp("faults")
    src = _tiles(root / "base", 6)
    B.build_index(src, "clip:tiny", root / "idx", B.BuildOptions(batch_size=8, progress=False, keep_tokens=True))
    return root


def test_kill_during_index_add(base_index, tmp_path):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(base_index / "idx", idx)
    new = _tiles(tmp_path / "new", 240, start=100)
    args = [sys.executable, "-m", "rsitr.cli", "-q", "index", "add", str(idx), str(new), "--batch-size", "8", "--chunk-size", "8"]
    chunks = idx / "chunks"

    def n_chunks() -> int:
        return len(list(chunks.glob("chunk-*.npz"))) if chunks.exists() else 0

    def merging() -> bool:  # the merge writes generation 2's files (under temporary names first)
        return any(".000002" in p.name for p in idx.iterdir())

    outcomes = []
    rng = np.random.default_rng(1)
    # two kills while chunks are being encoded (after this run wrote one more chunk, at a random
    # moment), then one during the merge into the new generation
    for target in ("chunks", "chunks", "merge"):
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start, t0, hit = n_chunks(), time.monotonic(), False
        while proc.poll() is None and time.monotonic() - t0 < 600:
            if (target == "chunks" and n_chunks() >= start + 2) or (target == "merge" and merging()):
                hit = True
                break
            time.sleep(0.005 if target == "merge" else 0.05)
        if target == "chunks":
            time.sleep(float(rng.uniform(0, 0.3)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        outcomes.append((target, hit, proc.returncode, _check_index(idx, {6, 246}), n_chunks()))
    p = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _check_index(idx, {246}) == 246
    print("index add kill outcomes (target, reached, exit, items served after the kill, chunks kept):", outcomes)
    assert outcomes[0][1] and outcomes[0][2] == -9 and outcomes[0][3] == 6 and outcomes[0][4] >= 2  # killed mid-encoding: old index served, chunks kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_reads_while_index_add_extends(base_index, tmp_path):
    import shutil

    import httpx

    idx = tmp_path / "idx"
    shutil.copytree(base_index / "idx", idx)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "rsitr.cli", "-q", "serve", str(idx), "--host", "127.0.0.1", "--port", str(port)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    adder = None
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() - t0 < 300, "server did not start"
            time.sleep(0.3)
        new = _tiles(tmp_path / "new", 60, start=500)
        # one add that completes (it commits a new generation and removes the old files), one killed mid-way
        adder = subprocess.Popen([sys.executable, "-m", "rsitr.cli", "-q", "index", "add", str(idx), str(new), "--batch-size", "8",
                                  "--chunk-size", "8"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        statuses: dict[int, int] = {}
        n_req = 0
        t_end = time.monotonic() + 240
        while time.monotonic() < t_end:
            for path, params in (("/search", {"q": "a red roof", "k": 5}), ("/search", {"q": "trees", "k": 5, "rerank": "ftf"}),
                                 ("/healthz", None)):
                r = httpx.get(base + path, params=params, timeout=60)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                n_req += 1
                if path == "/search" and r.status_code == 200:
                    for hit in r.json()["results"]:
                        assert 0 <= hit["id"] < 6  # the generation the server opened, whole
                        assert httpx.get(base + f"/tiles/{hit['id']}", params={"size": 64}, timeout=60).status_code == 200
            if adder.poll() is not None:
                break
        assert adder.returncode == 0, adder.stderr.read()[-2000:]
        assert statuses == {200: n_req}, statuses
        assert json.loads((idx / "manifest.json").read_text())["count"] == 66
        # the old generation's files are gone from disk; the server still answers from its maps
        r = httpx.get(base + "/search", params={"q": "trees", "k": 6, "rerank": "ftf"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 6
        # a fresh server opens the new generation
        from rsitr.search.engine import SearchEngine

        assert len(SearchEngine(idx, load_model=False)) == 66
    finally:
        for p in (adder, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
