"""Stores behind the registry: a test-only store (tests/numpy_store.py, one module) registered by
this test serves an index end to end - build, search, index add, serve - through the same code
paths as FAISS and Milvus, and its options reach it through --store-opt and its own spelled flags."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_search_cli

pytest.importorskip("faiss")
pytest.importorskip("rasterio")

from numpy_store import KIND, NumpyStore  # noqa: E402

from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.retrieval import stores as S  # noqa: E402
from rsitr.search import build as B  # noqa: E402
from rsitr.search.engine import SearchEngine  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402

TILE = 64


@pytest.fixture(scope="module", autouse=True)
def registered():
    S.register_store(NumpyStore)
    yield
    S.unregister_store(KIND)


@pytest.fixture(scope="module")
def tiny():
    return B.load_model("clip:tiny")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_sample_source(tmp_path_factory.mktemp("src"), n_png=3, grid=(1, 2), tile=TILE)


def _opts(**kw):
    return B.BuildOptions(**{"tile_size": TILE, "batch_size": 4, "progress": False, "engine": "torch", **kw})


def test_a_store_of_one_module_serves_an_index_end_to_end(tmp_path, source, tiny):
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    ref, out = tmp_path / "faiss", tmp_path / "np"
    B.build_index(source / "png", "clip:tiny", ref, _opts(), model=tiny)
    B.build_index(source / "png", "clip:tiny", out, _opts(store=KIND, store_options={"prefix": "v"}), model=tiny)
    m = B.read_manifest(out)
    assert m.store == {"kind": KIND, "prefix": "v", "scale": 1} and m.files["vectors"] == "v.000001.npy" and m.count == 3
    # index add through the store: the new generation's vectors are written by it
    r = B.add_to_index(out, source, _opts(), model=tiny)
    B.add_to_index(ref, source, _opts(), model=tiny)
    assert r.total == 5 and B.read_manifest(out).files["vectors"] == "v.000002.npy" and not (out / "v.000001.npy").exists()
    a, b = SearchEngine(ref, model=tiny, engine="torch"), SearchEngine(out, model=tiny, engine="torch")
    assert b.info()["store"] == KIND and len(b.vectors) == 5
    for q in ("a river", "buildings next to a road"):
        ra, rb = a.search(q, k=5), b.search(q, k=5)
        assert [x["id"] for x in ra] == [x["id"] for x in rb]
        np.testing.assert_allclose([x["score"] for x in ra], [x["score"] for x in rb], atol=1e-5)
    box = "14,44,16,46"  # the GeoTIFF's tiles only
    got = sorted(x["id"] for x in b.search("x", k=5, bbox=box))
    assert len(got) == 2 and got == sorted(x["id"] for x in a.search("x", k=5, bbox=box))
    client = TestClient(create_app(out, engine=b))
    res = client.get("/search", params={"q": "a river", "k": 5})
    assert res.status_code == 200 and [x["id"] for x in res.json()["results"]] == [x["id"] for x in a.search("a river", k=5)]


def test_store_options_through_the_cli(tmp_path, source, tiny, capsys):
    out = tmp_path / "idx"
    rc, _ = run_search_cli(["index", "build", str(source / "png"), "--checkpoint", "clip:tiny", "--out", str(out), "--tile-size",
                            str(TILE), "--engine", "torch", "--store", KIND, "--np-prefix", "w", "--store-opt", "scale=2"], capsys)
    assert rc == 0 and B.read_manifest(out).store == {"kind": KIND, "prefix": "w", "scale": 2}
    NumpyStore.opened.clear()
    rc, text = run_search_cli(["search", str(out), "a river", "--json", "--engine", "torch", "--np-scale", "3"], capsys)
    assert rc == 0 and NumpyStore.opened == [{"scale": 3}]  # the spelled flag is the store's reopen option
    scores3 = [x["score"] for x in json.loads(text)["results"]]
    rc, text = run_search_cli(["search", str(out), "a river", "--json", "--engine", "torch"], capsys)
    assert NumpyStore.opened[-1] == {"scale": 2}  # as recorded
    np.testing.assert_allclose(scores3, [1.5 * x["score"] for x in json.loads(text)["results"]], rtol=1e-5)
    # a build-only option is not a reopen option; a flag and --store-opt that disagree are refused
    with pytest.raises(RsitrError, match="prefix"):
        run_search_cli(["search", str(out), "x", "--store-opt", "prefix=z"], capsys)
    with pytest.raises(RsitrError, match="disagree"):
        run_search_cli(["search", str(out), "x", "--np-scale", "3", "--store-opt", "scale=4"], capsys)


def test_option_errors_name_the_store(tmp_path, source, tiny):
    with pytest.raises(RsitrError, match="--np-prefix apply to --store numpy-test, not --store faiss"):
        B.build_index(source, "clip:tiny", tmp_path / "a", _opts(store_options={"prefix": "x"}), model=tiny)
    with pytest.raises(RsitrError, match="--store-opt nope are not options of --store numpy-test"):
        B.build_index(source, "clip:tiny", tmp_path / "b", _opts(store=KIND, store_options={"nope": "1"}), model=tiny)
    with pytest.raises(RsitrError, match="integer"):
        S.parse_store_options(KIND, {"scale": "two"})
    with pytest.raises(RsitrError, match="KEY=VALUE"):
        S.parse_store_opt_args(["scale"])
    assert S.parse_store_options(KIND, {"scale": "5"}) == NumpyStore.Options(scale=5)


def test_unregistered_store_in_a_manifest_is_refused(tmp_path, source, tiny):
    out = tmp_path / "idx"
    B.build_index(source / "png", "clip:tiny", out, _opts(store=KIND), model=tiny)
    S.unregister_store(KIND)
    try:
        with pytest.raises(RsitrError, match=r"manifest.json: damaged index manifest: 'store.kind' is 'numpy-test'"):
            B.read_manifest(out)
    finally:
        S.register_store(NumpyStore)
