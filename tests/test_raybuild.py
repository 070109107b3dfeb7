"""Index build on Ray Data (local Ray): same index as the single-process build, resume after a kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rasterio")
pytest.importorskip("faiss")
pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray")

from rsitr.search import build as B  # noqa: E402
from rsitr.search import raybuild as R  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402

TILE = 64
SRC_ROOT = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (3 logical CPUs: two encoders + decode tasks)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    with R.ray_session(num_cpus=3):  # rsitr's own start: retried when a loaded machine misses Ray's start-up timeouts
        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_sample_source(tmp_path_factory.mktemp("src"), n_png=4, grid=(3, 4), tile=TILE)  # 4 PNGs + 12 geo tiles


def _opts(**kw):
    return B.BuildOptions(**{"tile_size": TILE, "batch_size": 2, "progress": False, "engine": "torch", **kw})


def _same_index(a: Path, b: Path) -> None:
    ma, mb = B.read_manifest(a), B.read_manifest(b)
    da, db = ma.to_dict(), mb.to_dict()
    for k in da.keys() | db.keys():
        if k not in ("created", "updated"):  # timings
            assert da.get(k) == db.get(k), k
    ia, ib = B.read_items(a, ma), B.read_items(b, mb)
    assert [it.to_json() for it in ia] == [it.to_json() for it in ib]
    diff = np.abs(B.read_embeddings(a, ma) - B.read_embeddings(b, mb)).max()
    assert diff < 1e-5, diff


def test_ray_build_equals_single_process_build(cluster, source, tmp_path):
    ref = tmp_path / "local"
    B.build_index(source, "clip:tiny", ref, _opts())
    out = tmp_path / "ray"
    r = R.build_index_ray(source, "clip:tiny", out, _opts(), R.RayOptions(workers=2, shard_size=3))
    assert r.encoded == 16 and r.total == 16 and r.added == 16
    assert not (out / R.SHARDS).exists()  # merged and removed
    _same_index(ref, out)
    # a finished index: nothing to encode again
    r = R.build_index_ray(source, "clip:tiny", out, _opts(), R.RayOptions(workers=1, shard_size=3))
    assert r.encoded == 0 and r.total == 16


def test_ray_workers_use_the_drivers_pixel_limit(cluster, source, tmp_path):
    """`rsitr --max-pixels N index build --executor ray`: the decode tasks in Ray's worker processes
    refuse what the driver's limit refuses (they used the default limit), as the single-process
    build does: the same items skipped, the same index."""
    from rsitr.data.images import image_size, max_pixels, set_max_pixels

    pngs = sorted(Path(source).rglob("*.png"))
    w, h = image_size(pngs[0])
    before = max_pixels()
    set_max_pixels(w * h - 1)  # every sample PNG is over it; the geo tiles are windows of a raster
    try:
        ref = tmp_path / "local"
        B.build_index(source, "clip:tiny", ref, _opts(skip_bad=True))
        out = tmp_path / "ray"
        r = R.build_index_ray(source, "clip:tiny", out, _opts(skip_bad=True), R.RayOptions(workers=1, shard_size=4))
    finally:
        set_max_pixels(before)
    assert B.read_manifest(ref).count == 12 and r.total == 12
    _same_index(ref, out)


def test_ray_build_resumes_after_the_driver_is_killed(cluster, source, tmp_path):
    out = tmp_path / "idx"
    # the driver joins the running Ray (--ray-address) and encodes slowly enough to be killed mid-way;
    # the encoder subclass is defined in __main__, so Ray ships it by value to its workers
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from rsitr.search import build as B, raybuild as R

        class SlowEncoder(R.TileEncoder):
            def __call__(self, batch):
                time.sleep(0.4)
                return super().__call__(batch)

        R.build_index_ray({str(source)!r}, "clip:tiny", {str(out)!r},
                          B.BuildOptions(tile_size={TILE}, batch_size=2, progress=False, engine="torch"),
                          R.RayOptions(address={cluster!r}, workers=1, shard_size=2), encoder_cls=SlowEncoder)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while len(list((out / R.SHARDS).glob("shard-*.parquet"))) < 2:
            if proc.poll() is not None:
                pytest.fail(f"driver ended before it was killed: {proc.stderr.read().decode()[-2000:]}")
            if time.time() - t0 > 240:
                pytest.fail("no shard written within 240 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-build
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    written = {}
    for p in sorted((out / R.SHARDS).glob("shard-*.parquet")):
        written[p.name] = R.read_shard(p, B.read_manifest(out).model.state_sha256, columns=["key"])["keys"]
    done = {k for ks in written.values() for k in ks}
    assert 2 <= len(done) < 16 and B.read_manifest(out).count == 0  # mid-way: shards on disk, nothing merged
    # re-run: only what no shard holds is encoded
    r = R.build_index_ray(source, "clip:tiny", out, _opts(), R.RayOptions(workers=1, shard_size=2))
    assert r.encoded == 16 - len(done) and r.total == 16
    ref = tmp_path / "ref"
    B.build_index(source, "clip:tiny", ref, _opts())
    _same_index(ref, out)


def test_ray_build_refusals(cluster, source, tmp_path):
    with pytest.raises(RsitrError, match="keep-tokens"):
        R.build_index_ray(source, "clip:tiny", tmp_path / "a", _opts(keep_tokens=True))
    with pytest.raises(RsitrError, match="ray-workers"):
        R.build_index_ray(source, "clip:tiny", tmp_path / "b", _opts(), R.RayOptions(workers=0))
    bad = tmp_path / "bad"
    write_sample_source(bad, n_png=2, geotiff=False)
    (bad / "png" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RsitrError, match="broken.png"):
        R.build_index_ray(bad, "clip:tiny", tmp_path / "c", _opts())
    r = R.build_index_ray(bad, "clip:tiny", tmp_path / "d", _opts(skip_bad=True))
    assert r.total == 2


def test_errors_raised_inside_ray_become_one_line():
    class Wrapped(Exception):
        pass

    msg = ("The actor died because of an error raised in its creation task ...\n  File \"x.py\", line 1\n"
           "rsitr.utils.errors.RsitrError: encoder on this node loaded m.pt with weights sha256 0f89, the index expects b4fa\n")
    err = R._user_error(Wrapped(msg))
    assert isinstance(err, RsitrError) and str(err).startswith("encoder on this node loaded m.pt")
    assert R._user_error(Wrapped("something else")) is None
    try:
        raise RuntimeError("outer") from RsitrError("inner\nlast line")
    except RuntimeError as exc:
        assert str(R._user_error(exc)) == "last line"


class _FakeRay:
    """A stand-in for the ray module whose local start fails ``fails`` times (as Ray's start-up
    timeout does on a loaded machine), then starts."""

    def __init__(self, fails: int, exc: Exception):
        self.fails, self.exc, self.inits, self.shutdowns, self.up = fails, exc, [], 0, False
        ctx = type("Ctx", (), {"enable_progress_bars": True})()
        self.data = type("Data", (), {"DataContext": type("DC", (), {"get_current": staticmethod(lambda: ctx)})})

    def is_initialized(self):
        return self.up

    def init(self, **kw):
        self.inits.append(kw)
        if len(self.inits) <= self.fails:
            raise self.exc
        self.up = True

    def shutdown(self):
        self.shutdowns += 1
        self.up = False

    def cluster_resources(self):
        return {"CPU": 2.0}


@pytest.mark.parametrize("fails,address,exc,ok", [
    (0, None, RuntimeError("x"), True),
    (2, None, RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y"), True),  # third start works
    (3, None, RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y"), False),  # every start fails
    (1, "10.0.0.1:6379", RuntimeError("no cluster"), False),  # joining a cluster is not retried
    (1, None, ValueError("bad num_cpus"), False),  # not a start-up timeout: not retried
    (2, None, Exception("The current node timed out during startup. This could happen because ..."), True),  # the raylet's 30 s
    (1, None, Exception("something else"), False),  # a bare Exception that is no timeout: one line, not retried
    (1, None, RuntimeError("Attempting to kill a process of type 'raylet', but this process is already dead."), False),
    (1, None, RuntimeError("Unknown keyword argument(s): bad"), False),  # a RuntimeError that is no timeout: not retried
    (2, None, RuntimeError("Failed to start GCS.  Last 0 lines of error files:"), True),
])
def test_a_local_ray_start_that_times_out_is_retried(monkeypatch, caplog, fails, address, exc, ok):
    fake = _FakeRay(fails, exc)
    monkeypatch.setattr(R, "_ray", lambda: fake)
    monkeypatch.setattr(R, "LOCAL_RETRY_WAIT_S", 0.0)
    if ok:
        with R.ray_session(address=address, num_cpus=2) as got:
            assert got is fake and fake.up
        assert len(fake.inits) == fails + 1 and not fake.up
        assert fake.shutdowns == fails + 1  # each failed start cleaned up before the next, and the session's own at exit
        assert sum("starting again" in r.getMessage() for r in caplog.records) == fails
    else:
        with pytest.raises(RsitrError, match="cannot start or join Ray") as info:
            with R.ray_session(address=address, num_cpus=2):
                pass
        assert "\n" not in str(info.value).split(": ", 1)[0]
        retried = address is None and R._start_timed_out(exc)
        assert len(fake.inits) == (R.LOCAL_START_ATTEMPTS if retried else 1)
        assert fake.shutdowns == len(fake.inits)  # the last failed start is cleaned up too, not left running
