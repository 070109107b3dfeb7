"""An index built by one process is searched, grown and served by others (issue 29 A).

Milvus Lite reopens a collection that has a vector index as *released*; the tests of the other
store files build and search in one process, where it stays loaded, so they never saw it. Here
every step is its own ``python -m rsitr.cli`` process, for both stores, and the builder's output
must hold no ERROR line and no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
TILE = 64


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsitr.cli", "--threads", "1", *argv], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _clean(p: subprocess.CompletedProcess, what: str) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{what} exited {p.returncode}:\n{out}"
    assert "Traceback" not in out and " ERROR " not in out, f"{what} printed an error:\n{out}"
    return p.stdout


def _hits(stdout: str) -> list[str]:
    """The result paths of `rsitr search --json`."""
    return [r["path"] for r in json.loads(stdout)["results"]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from rsitr.bench.search import write_sample_source

    first = write_sample_source(tmp_path_factory.mktemp("first"), n_png=3, grid=(2, 2), tile=TILE)
    more = write_sample_source(tmp_path_factory.mktemp("more"), n_png=2, grid=(1, 2), tile=TILE, seed=5)
    return first, more


@pytest.mark.parametrize("store", ["faiss", "milvus"])
def test_build_then_search_add_and_serve_in_other_processes(tmp_path, sources, store):
    if store == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
    first, more = sources
    idx = tmp_path / "idx"
    extra = ["--store", "milvus", "--milvus-uri", str(tmp_path / "idx.db")] if store == "milvus" else []
    common = ["--checkpoint", "clip:tiny", "--tile-size", str(TILE), "--batch-size", "8"]
    _clean(_cli("index", "build", str(first), "--out", str(idx), *common, *extra), "index build")

    got = _hits(_clean(_cli("search", str(idx), "storage tanks next to a river", "-k", "5", "--json"), "search"))
    assert len(got) == 5

    _clean(_cli("index", "add", str(idx), str(more), "--batch-size", "8"), "index add")
    got = _hits(_clean(_cli("search", str(idx), "storage tanks next to a river", "-k", "50", "--json"), "search after add"))
    n_more = 2 + 2  # 2 PNGs + a 1x2 grid of tiles
    assert len(got) == 3 + 4 + n_more
    assert any(str(more) in g for g in got)

    # a server process of its own (here: this test's process) answers from the index
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    with TestClient(create_app(idx, inference="torch")) as c:
        r = c.get("/search", params={"q": "storage tanks next to a river", "k": 5})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 5
