"""Indexes on both stores: the same answers from `rsitr search` / the API, box filters end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_search_cli

pytest.importorskip("rasterio")
pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from rsitr.retrieval.bbox import footprint_array, intersects, parse_bbox  # noqa: E402
from rsitr.retrieval.stores import MilvusStore  # noqa: E402
from rsitr.search import build as B  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.search.engine import SearchEngine  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402

TILE = 64
QUERIES = ["a river next to green fields", "storage tanks", "many buildings and a road"]


@pytest.fixture(scope="module")
def tiny():
    return B.load_model("clip:tiny")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_sample_source(tmp_path_factory.mktemp("src"), n_png=3, grid=(3, 4), tile=TILE)  # 3 PNGs + 12 geo tiles


def _opts(**kw):
    return B.BuildOptions(**{"tile_size": TILE, "batch_size": 8, "progress": False, "engine": "torch", **kw})


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, source, tiny):
    root = tmp_path_factory.mktemp("idx")
    B.build_index(source, "clip:tiny", root / "faiss", _opts(), model=tiny)
    B.build_index(source, "clip:tiny", root / "milvus", _opts(store="milvus", store_options={"uri": str(root / "m.db")}), model=tiny)
    return root / "faiss", root / "milvus"


def _box_of(index_dir) -> str:
    """A box over part of the scene: the first geo tile's west half, all rows of its column."""
    items = [it for it in B.read_items(index_dir, B.read_manifest(index_dir)) if it.wgs84]
    w, s, e, n = items[0].wgs84
    south = min(it.wgs84[1] for it in items)
    return f"{w},{south},{(w + e) / 2},{n}"


def test_manifest_names_the_store(indexes):
    f, m = (B.read_manifest(p) for p in indexes)
    assert f.store == {"kind": "faiss"} and "footprints" in f.files
    assert m.store["kind"] == "milvus" and m.store["index"] == "FLAT" and m.store["uri"].endswith("m.db")
    assert "vectors" not in m.files and m.count == f.count == 15
    np.testing.assert_array_equal(B.read_embeddings(indexes[0], f), B.read_embeddings(indexes[1], m))


def test_same_answers_from_both_stores(indexes, tiny):
    fe, me = SearchEngine(indexes[0], model=tiny), SearchEngine(indexes[1], model=tiny)
    try:
        assert me.info()["store"] == "milvus" and fe.info()["store"] == "faiss"
        box = _box_of(indexes[0])
        for q in QUERIES:
            for b in (None, box):
                a, c = fe.search(q, k=10, bbox=b), me.search(q, k=10, bbox=b)
                assert [r["id"] for r in a] == [r["id"] for r in c]
                np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in c], atol=1e-5)
    finally:
        me.close()


def test_bbox_search_matches_brute_force(indexes, tiny):
    idx = indexes[0]
    items = B.read_items(idx, B.read_manifest(idx))
    emb = B.read_embeddings(idx, B.read_manifest(idx))
    fp, has = footprint_array([it.wgs84 for it in items])
    box = parse_bbox(_box_of(idx))
    sel = np.flatnonzero(intersects(fp, has, box))
    assert 0 < len(sel) < 12  # a real filter: some geo tiles in, some out, PNGs out
    for store_dir in indexes:
        eng = SearchEngine(store_dir, model=tiny)
        try:
            for q in QUERIES:
                res = eng.search(q, k=20, bbox=box)
                qv = eng.encode_text(q)[0]
                s = emb[sel] @ qv
                want = sel[np.lexsort((sel, -s))]
                assert [r["id"] for r in res] == want.tolist()
                for r in res:
                    w, so, e, n = r["wgs84"]
                    assert w <= box.east and e >= box.west and so <= box.north and n >= box.south
            res = eng.search_image(items[0].path, k=5, bbox=box)  # image queries honour the box as well
            assert {r["id"] for r in res} <= set(sel.tolist())
        finally:
            eng.close()


def _run(argv, capsys):
    return run_search_cli(argv, capsys)


def test_cli_bbox_on_both_stores(indexes, capsys):
    box = _box_of(indexes[0])
    outs = []
    for idx in indexes:
        rc, out = _run(["search", str(idx), "fields and a river", "-k", "20", "--bbox", box, "--json", "--engine", "torch"], capsys)
        assert rc == 0
        outs.append(json.loads(out))
    assert outs[0]["bbox"] == parse_bbox(box).as_list()
    assert [r["id"] for r in outs[0]["results"]] == [r["id"] for r in outs[1]["results"]]
    assert 0 < len(outs[0]["results"]) < 12
    with pytest.raises(RsitrError, match="south"):
        _run(["search", str(indexes[1]), "x", "--bbox", "15,46,16,45"], capsys)


def test_milvus_index_grows_and_recovers_an_interrupted_merge(tmp_path, source, tiny):
    out = tmp_path / "idx"
    db = tmp_path / "g.db"
    B.build_index(source / "png", "clip:tiny", out, _opts(store="milvus", store_options={"uri": str(db)}), model=tiny)
    m = B.read_manifest(out)
    assert m.count == 3
    # a merge killed after writing to Milvus but before the manifest switched leaves rows past the count
    with MilvusStore.from_spec(m.store, m.embed_dim, m.index_kind) as st:
        st.add(np.ones((2, st.dim), np.float32), [{"id": 3, "path": "/ghost/a.png"}, {"id": 4, "path": "/ghost/b.png"}])
        assert len(st) == 5
    r = B.add_to_index(out, source, _opts(), model=tiny)
    assert r.total == 15 and r.added == 12
    eng = SearchEngine(out, model=tiny)
    try:
        assert len(eng.vectors) == 15
        assert all(not r["path"].startswith("/ghost") for r in eng.search("a field", k=15))
    finally:
        eng.close()
    with pytest.raises(RsitrError, match="another one"):
        B.build_index(source, "clip:tiny", out, _opts(store="milvus", store_options={"uri": str(tmp_path / "other.db")}), model=tiny)


def test_store_option_errors(tmp_path, source, tiny, indexes):
    with pytest.raises(RsitrError, match="needs --milvus-uri"):
        B.build_index(source, "clip:tiny", tmp_path / "a", _opts(store="milvus"), model=tiny)
    with pytest.raises(RsitrError, match="apply to --store milvus"):
        B.build_index(source, "clip:tiny", tmp_path / "b", _opts(store_options={"uri": str(tmp_path / "x.db")}), model=tiny)
    with pytest.raises(RsitrError, match="store faiss"):
        B.build_index(source, "clip:tiny", indexes[0], _opts(store="milvus", store_options={"uri": str(tmp_path / "x.db")}), model=tiny)
    # an existing collection is never taken over by a new index
    m = B.read_manifest(indexes[1])
    with pytest.raises(RsitrError, match="already exists"):
        B.build_index(source, "clip:tiny", tmp_path / "c", _opts(store="milvus", store_options={
            "uri": m.store["uri"], "collection": m.store["collection"]}), model=tiny)
    assert not (tmp_path / "c").exists()


def test_api_same_answers_and_bad_box(indexes):
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    box = _box_of(indexes[0])
    answers = []
    for idx in indexes:
        c = TestClient(create_app(idx, inference="torch"))
        try:
            h = c.get("/healthz").json()
            assert h["store"] in ("faiss", "milvus")
            got = c.get("/search", params={"q": "a river next to green fields", "k": 10, "bbox": box})
            assert got.status_code == 200 and got.json()["bbox"] == parse_bbox(box).as_list()
            answers.append([r["id"] for r in got.json()["results"]])
            for bad in ("1,2,3", "a,b,c,d", "0,10,1,5", "0,0,200,1"):
                r = c.get("/search", params={"q": "x", "bbox": bad})
                assert r.status_code == 422 and "bbox" in r.json()["detail"]
            assert c.get("/search", params={"q": "x", "bbox": ""}).status_code == 200  # empty: no filter
        finally:
            c.app.state.engine.close()
    assert answers[0] == answers[1] and answers[0]
