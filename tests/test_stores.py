"""Vector stores (FAISS, Milvus Lite) and WGS84 box filters against brute force."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from rsitr.retrieval.bbox import BBox, footprint_array, intersects, parse_bbox  # noqa: E402
from rsitr.retrieval.stores import FaissStore, MilvusStore, normalize_uri  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402

DIM = 16


def _lon_intervals(w, e):
    return [(w, e)] if w <= e else [(w, 180.0), (-180.0, e)]


def brute_intersects(fp, box: BBox) -> bool:
    """Independent definition: footprint and box as closed lon intervals (split at the antimeridian)."""
    if fp is None:
        return False
    w, s, e, n = fp
    if not (s <= box.north and box.south <= n):
        return False
    return any(a0 <= b1 and b0 <= a1 for a0, a1 in _lon_intervals(w, e) for b0, b1 in _lon_intervals(box.west, box.east))


def _data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recs = []
    for i in range(n):
        if i % 7 == 0:
            wgs = None  # an image without a footprint
        else:
            w = float(rng.uniform(-180, 180))
            width = float(rng.uniform(0.01, 30))
            e = w + width if w + width <= 180 else w + width - 360  # some cross the antimeridian (w > e)
            s = float(rng.uniform(-80, 70))
            wgs = [w, s, e, s + float(rng.uniform(0.01, 10))]
        recs.append({"id": i, "key": f"k{i}", "path": f"/a/{i}.tif", "window": [i, 0, 64, 64] if wgs else None,
                     "crs": "EPSG:4326" if wgs else None, "wgs84": wgs})
    return x, recs


BOXES = ["-10,-20,40,30", "170,-90,-170,90", "0,0,0,0", "-180,-90,180,90", "100.5,10.25,101,10.75", "-60,60,-50,61"]


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def faiss_flat(data):
    x, recs = data
    st = FaissStore.create(DIM, "flat")
    st.add(x, recs)
    return st


@pytest.fixture(scope="module")
def milvus(tmp_path_factory, data):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    x, recs = data
    st = MilvusStore(str(tmp_path_factory.mktemp("mv") / "m.db"), "t_flat", DIM, "flat")
    st.create()
    st.add(x[:250], recs[:250])
    st.add(x[250:], recs[250:])
    yield st
    st.close()


# -- boxes ---------------------------------------------------------------------------------------
def test_parse_bbox():
    assert parse_bbox("1,2,3,4") == BBox(1, 2, 3, 4)
    assert parse_bbox(" -1.5 , -2 ,3e0, 4 ").as_list() == [-1.5, -2.0, 3.0, 4.0]
    assert parse_bbox([170, -5, -170, 5]).crosses_antimeridian
    for bad, msg in [("1,2,3", "4 comma"), ("1,2,3,4,5", "4 comma"), ("a,2,3,4", "numbers"), ("nan,2,3,4", "finite"),
                     ("1,2,inf,4", "finite"), ("-181,0,1,1", "longitudes"), ("0,-91,1,1", "latitudes"), ("0,5,1,4", "south"), ("", "4 comma")]:
        with pytest.raises(RsitrError, match=msg):
            parse_bbox(bad)


def test_intersects_matches_brute_force(data):
    _, recs = data
    fp, has = footprint_array([r["wgs84"] for r in recs])
    rng = np.random.default_rng(1)
    boxes = [parse_bbox(b) for b in BOXES]
    for _ in range(40):
        w, e = rng.uniform(-180, 180, 2)
        s, n = np.sort(rng.uniform(-90, 90, 2))
        boxes.append(BBox(float(w), float(s), float(e), float(n)))
    for box in boxes:
        want = [brute_intersects(r["wgs84"], box) for r in recs]
        assert intersects(fp, has, box).tolist() == want, box
    # touching edges count; the footprint-less never match
    assert intersects(np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([True]), BBox(1, 1, 2, 2)).tolist() == [True]
    assert not intersects(fp, has, BBox(-180, -90, 180, 90))[~has].any()


# -- FAISS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_filter_then_rank_is_exact(data, kind):
    x, recs = data
    kw = {"nlist": 8} if kind == "ivf" else {}
    st = FaissStore.create(DIM, kind, **kw)
    st.add(x, recs)
    q = np.random.default_rng(2).standard_normal((5, DIM)).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    for b in BOXES:
        box = parse_bbox(b)
        sel = np.array([i for i, r in enumerate(recs) if brute_intersects(r["wgs84"], box)], np.int64)
        assert st.ids_in(box).tolist() == sel.tolist()
        scores, ids = st.search(q, 10, box)
        assert ids.shape == (5, min(10, len(sel)))
        for r in range(5):
            s = qn[r] @ x[sel].T
            order = np.lexsort((sel, -s))[:10]
            assert ids[r].tolist() == sel[order].tolist()
            np.testing.assert_allclose(scores[r], s[order], atol=1e-5)


def test_faiss_store_round_trip(tmp_path, data, faiss_flat):
    x, recs = data
    faiss_flat.save(tmp_path / "v.faiss", tmp_path / "fp.npy")
    st = FaissStore.load(tmp_path / "v.faiss", tmp_path / "fp.npy")
    assert len(st) == len(x)
    q = x[:3] + 0.1
    for b in (None, BOXES[0], BOXES[1]):
        a, b_ = faiss_flat.search(q, 10, b), st.search(q, 10, b)
        assert a[1].tolist() == b_[1].tolist()
    with pytest.raises(RsitrError, match="continue from"):
        st.add(x[:1], [dict(recs[0], id=5)])


# -- Milvus Lite ---------------------------------------------------------------------------------
def test_milvus_round_trip(milvus, data):
    x, recs = data
    assert len(milvus) == len(x)
    got = milvus.records([3, 1, 7])
    assert [g["id"] for g in got] == [3, 1, 7]
    assert got[0]["path"] == recs[3]["path"] and list(got[0]["window"]) == recs[3]["window"]
    assert [got[0][f] for f in ("west", "south", "east", "north")] == recs[3]["wgs84"]  # DOUBLE fields: exact
    assert got[2]["has_geo"] is False and list(got[2]["window"]) == []
    # upsert by id: writing the same rows again changes nothing
    milvus.add(x[:50], recs[:50])
    assert len(milvus) == len(x)


def test_milvus_and_faiss_flat_agree(milvus, faiss_flat, data):
    x, recs = data
    q = np.random.default_rng(3).standard_normal((20, DIM)).astype(np.float32)
    fs, fi = faiss_flat.search(q, 10)
    ms, mi = milvus.search(q, 10)
    for r in range(len(q)):
        if np.all(np.diff(fs[r]) < -1e-5):  # ties aside
            assert mi[r].tolist() == fi[r].tolist()
        np.testing.assert_allclose(ms[r], fs[r], atol=1e-5)
    for b in BOXES:
        assert milvus.ids_in(b).tolist() == faiss_flat.ids_in(b).tolist(), b
        fs, fi = faiss_flat.search(q, 10, b)
        ms, mi = milvus.search(q, 10, b)
        assert mi.shape == fi.shape
        assert mi.tolist() == fi.tolist(), b
        np.testing.assert_allclose(ms, fs, atol=1e-5)


def test_milvus_errors(tmp_path, milvus):
    with pytest.raises(RsitrError, match="already exists"):
        MilvusStore(milvus.uri, "t_flat", DIM).create()
    with pytest.raises(RsitrError, match="collection name"):
        MilvusStore(milvus.uri, "bad name!", DIM)
    with pytest.raises(RsitrError, match="not found"):
        len(MilvusStore(milvus.uri, "nope", DIM))
    with pytest.raises(RsitrError, match="at most"):
        milvus.search(np.ones(DIM), 20000)
    with pytest.raises(RsitrError, match="milvus-uri"):
        normalize_uri("somewhere")
    assert normalize_uri("http://127.0.0.1:19530") == "http://127.0.0.1:19530"
    assert normalize_uri(str(tmp_path / "x.db")).endswith("/x.db")


def test_milvus_delete_from(tmp_path, data):
    pytest.importorskip("milvus_lite")
    x, recs = data
    with MilvusStore(str(tmp_path / "d.db"), "d", DIM, "hnsw") as st:
        st.create()
        st.add(x[:40], recs[:40])
        st.delete_from(30)
        assert len(st) == 30
        _, ids = st.search(x[35], 5)
        assert 35 not in ids[0].tolist()
        assert st.spec()["index"] == "HNSW"
