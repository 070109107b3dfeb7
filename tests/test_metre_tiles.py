"""Georeferenced rasters tiled in metres, no-data skipped, stretched per scene; contact sheets; quicklooks."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from conftest import run_search_cli

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("faiss")

from PIL import Image  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402
from rasterio.windows import Window, bounds as window_bounds  # noqa: E402

from rsitr.search import build as B  # noqa: E402
from rsitr.search.engine import SearchEngine  # noqa: E402
from rsitr.search.sheet import cell_origin, sheet_size, write_contact_sheet  # noqa: E402
from rsitr.search.sources import Tiling, read_item, scan_scene, scan_source  # noqa: E402
from rsitr.utils.errors import DataError, RsitrError  # noqa: E402

US_FOOT = 1200.0 / 3937.0  # metres
EARTH_R = 6371008.8  # mean radius: an independent (spherical) check of the ellipsoidal sizes, good to ~0.5 %


@pytest.fixture(scope="module")
def tiny():
    return B.load_model("clip:tiny")


def write_scene(path, data, *, crs="EPSG:32633", transform=None, nodata=None, alpha=None):
    """``data`` [bands, h, w] (any dtype); ``alpha`` [h, w] uint8 appended as an alpha band."""
    count, h, w = data.shape
    transform = transform or from_origin(500000.0, 5000000.0, 1.0, 1.0)
    kw = {"nodata": nodata} if nodata is not None else {}
    bands = data if alpha is None else np.concatenate([data, alpha[None].astype(data.dtype)])
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=len(bands), dtype=str(data.dtype), crs=crs,
                       transform=transform, **kw) as ds:
        ds.write(bands)
        if alpha is not None:
            from rasterio.enums import ColorInterp

            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha][:count] + [ColorInterp.alpha]
    return path


def textured(h, w, count=3, seed=0, dtype=np.uint8, lo=20, hi=230):
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi, (count, h, w)).astype(dtype)


def haversine(lon0, lat0, lon1, lat1):
    p0, p1 = math.radians(lat0), math.radians(lat1)
    a = math.sin((p1 - p0) / 2) ** 2 + math.cos(p0) * math.cos(p1) * math.sin(math.radians(lon1 - lon0) / 2) ** 2
    return 2 * EARTH_R * math.asin(math.sqrt(a))


# -- tiles in metres ----------------------------------------------------------------------------------
SCENES = {
    # name: (crs, transform, width, height, ground size of a tile's side from its window and transform)
    "utm": ("EPSG:32633", from_origin(499000.0, 5000000.0, 0.5, 0.5), 600, 500,
            lambda t, win: (win[2] * t.a, win[3] * -t.e)),
    "feet": ("EPSG:2263", from_origin(990000.0, 200000.0, 1.0, 1.0), 900, 700,
             lambda t, win: (win[2] * t.a * US_FOOT, win[3] * -t.e * US_FOOT)),
    "wgs84-70N": ("EPSG:4326", from_origin(20.0, 70.02, 1e-5, 4e-6), 800, 900, None),
}


@pytest.mark.parametrize("name", list(SCENES))
def test_tiles_in_metres_have_their_ground_size_and_exact_footprints(tmp_path, name):
    crs, t, w, h, size_of = SCENES[name]
    p = write_scene(tmp_path / "s.tif", textured(h, w), crs=crs, transform=t)
    M = 100.0
    scan = scan_scene(p, Tiling(meters=(M,), out_px=48))
    assert scan.items and scan.skipped_nodata == 0
    full = [it for it in scan.items if it.window[0] + it.window[2] < w and it.window[1] + it.window[3] < h]  # not edge-clipped
    assert full
    for it in scan.items:
        col, row, ww, hh = it.window
        assert it.extra["scale_m"] == M
        b = window_bounds(Window(col, row, ww, hh), t)
        assert it.bounds == pytest.approx(list(b), abs=1e-9)  # footprints exact vs rasterio's transform
        assert it.wgs84 == pytest.approx(list(transform_bounds(crs, "EPSG:4326", *b, densify_pts=21)), abs=1e-9)
        if size_of is not None:
            gx, gy = size_of(t, it.window)
        else:  # degrees: measured on a sphere along the tile's middle parallel and its meridian
            W, S, E, N = it.bounds
            gx = haversine(W, (S + N) / 2, E, (S + N) / 2)
            gy = haversine(W, S, W, N)
        assert gx == pytest.approx(M, rel=0.01) and gy == pytest.approx(M, rel=0.01), (it.window, gx, gy)
    img = read_item(full[0])
    assert img.size == (48, 48)  # read resampled straight to the model's input size
    if name == "wgs84-70N":
        # at 70 N a degree of longitude is ~0.34 of a degree of latitude: the window is not square in pixels
        assert full[0].window[2] < full[0].window[3] * 1.2


def test_geographic_tile_width_follows_latitude(tmp_path):
    """Per tile row: in EPSG:4326 a tile near the pole is more pixels wide than one nearer the equator."""
    t = from_origin(10.0, 81.0, 0.01, 0.025)
    p = write_scene(tmp_path / "tall.tif", textured(400, 300), crs="EPSG:4326", transform=t)  # 81 N .. 71 N
    items = scan_scene(p, Tiling(meters=(10000.0,), out_px=32)).items
    top = min(items, key=lambda it: it.window[1])
    bottom = max(items, key=lambda it: it.window[1])
    ratio = top.window[2] / bottom.window[2]
    lat = lambda it: 81.0 - (it.window[1] + it.window[3] / 2) * 0.025  # noqa: E731
    want = math.cos(math.radians(lat(bottom))) / math.cos(math.radians(lat(top)))
    assert ratio == pytest.approx(want, rel=0.03)


def test_multiscale_overlap_and_small_scene(tmp_path):
    p = write_scene(tmp_path / "s.tif", textured(400, 400))  # 400 m x 400 m at 1 m
    items = scan_scene(p, Tiling(meters=(100.0, 1000.0), overlap_m=50.0, out_px=32)).items
    small = [it for it in items if it.extra["scale_m"] == 100.0]
    big = [it for it in items if it.extra["scale_m"] == 1000.0]
    assert sorted({it.window[0] for it in small}) == [0, 50, 100, 150, 200, 250, 300]  # stride 50 m
    assert all(it.window[2:] == [100, 100] for it in small)
    # a scene smaller than a tile: one tile of the whole scene, read at the same ground sampling
    assert len(big) == 1 and big[0].window == [0, 0, 400, 400] and big[0].extra["whole_scene"] is True
    assert big[0].extra["px"] == [13, 13] and read_item(big[0]).size == (13, 13)
    with pytest.raises(RsitrError, match="--overlap"):
        Tiling(meters=(100.0, 40.0), overlap_m=40.0, out_px=32).check()


def test_rgb_bands_follow_colour_interpretation(tmp_path):
    from rasterio.enums import ColorInterp

    d = np.zeros((4, 32, 32), np.uint8)
    d[0], d[1], d[2], d[3] = 10, 20, 30, 40
    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", width=32, height=32, count=4, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000.0, 5000000.0, 1.0, 1.0)) as ds:
        ds.write(d)
        ds.colorinterp = [ColorInterp.undefined, ColorInterp.blue, ColorInterp.green, ColorInterp.red]
    (it,) = scan_source(tmp_path / "s.tif", tile_size=32)
    assert np.asarray(read_item(it))[0, 0].tolist() == [40, 30, 20]


# -- no-data ------------------------------------------------------------------------------------------
def _nodata_scene(tmp_path, kind):
    """A 400 x 400 px scene (1 m) in 100 m tiles: the first tile column entirely no-data, the second 30 % no-data."""
    if kind == "nodata":
        d = textured(400, 400, dtype=np.uint16, lo=100, hi=4000)
        d[:, :, :130] = 0
        return write_scene(tmp_path / f"{kind}.tif", d, nodata=0)
    if kind == "alpha":
        a = np.full((400, 400), 255, np.uint8)
        a[:, :130] = 0
        return write_scene(tmp_path / f"{kind}.tif", textured(400, 400), alpha=a)
    d = textured(400, 400, dtype=np.float32, lo=0, hi=1000)
    d[:, :, :130] = np.nan
    return write_scene(tmp_path / f"{kind}.tif", d)


@pytest.mark.parametrize("kind", ["nodata", "alpha", "nan"])
@pytest.mark.parametrize("metres", [True, False])
def test_mostly_nodata_tiles_are_skipped_and_counted(tmp_path, kind, metres, caplog):
    p = _nodata_scene(tmp_path, kind)
    tiling = Tiling(meters=(100.0,), out_px=32) if metres else Tiling(tile_size=100)
    with caplog.at_level(logging.INFO, logger="rsitr.search.sources"):
        scan = scan_scene(p, tiling)
        scan.log_notes()
    assert scan.skipped_nodata == 4 and len(scan.items) == 12
    assert all(it.window[0] >= 100 for it in scan.items)
    assert "skipped 4 tiles that are mostly no-data" in caplog.text
    # the 30 %-no-data column is kept, its no-data drawn black
    it = next(i for i in scan.items if i.window[0] == 100)
    a = np.asarray(read_item(it))
    assert (a[:, : a.shape[1] * 30 // 100 - 1] == 0).all() and a[:, a.shape[1] // 2 :].max() > 0
    # a threshold of 1 keeps every tile that has a valid pixel
    keep = Tiling(meters=(100.0,), out_px=32, max_nodata=1.0) if metres else Tiling(tile_size=100, max_nodata=1.0)
    assert len(scan_scene(p, keep).items) == 16


def test_all_nodata_raster_is_skipped_with_a_warning(tmp_path, caplog):
    d = np.zeros((3, 64, 64), np.uint16)
    p = write_scene(tmp_path / "empty.tif", d, nodata=0)
    write_scene(tmp_path / "ok.tif", textured(64, 64))
    with caplog.at_level(logging.WARNING):
        items = scan_source(tmp_path, tile_size=32)
    assert items and all(it.path.endswith("ok.tif") for it in items)
    assert f"{p}: every pixel is no-data" in caplog.text


@pytest.mark.parametrize("metres", [True, False])
def test_black_fill_without_declared_nodata_is_warned_about(tmp_path, metres, caplog):
    """A raster whose footprint is padded with pure black but that declares no no-data (as the Manila
    drone scene in eval/geo): its black tiles are indexed (nothing says they are fill) and a warning
    names the file, counts them and says how to declare the no-data; declared, they are skipped."""
    d = textured(400, 400)
    d[:, :, :130] = 0
    tiling = Tiling(meters=(100.0,), out_px=32) if metres else Tiling(tile_size=100)
    p = write_scene(tmp_path / "black.tif", d)
    with caplog.at_level(logging.INFO, logger="rsitr.search.sources"):
        scan = scan_scene(p, tiling)
        scan.log_notes()
    assert len(scan.items) == 16 and scan.skipped_nodata == 0
    assert f"{p}: 4 of 16 tiles are mostly pure black" in caplog.text and "gdal_edit.py -a_nodata 0" in caplog.text
    assert "--black-nodata" in caplog.text
    caplog.clear()
    q = write_scene(tmp_path / "declared.tif", d, nodata=0)
    with caplog.at_level(logging.INFO, logger="rsitr.search.sources"):
        scan = scan_scene(q, tiling)
        scan.log_notes()
    assert scan.skipped_nodata == 4 and "pure black" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rsitr.search.sources"):  # dark but not black: no warning
        scan_scene(write_scene(tmp_path / "dark.tif", textured(400, 400, lo=1, hi=20)), tiling).log_notes()
    assert "pure black" not in caplog.text


@pytest.mark.parametrize("seed", range(6))
def test_black_nodata_skips_exactly_the_tiles_mostly_black_or_nodata(tmp_path, seed):
    """--black-nodata on generated scenes: random black rectangles (undeclared fill) and, in some, a
    declared no-data; a tile is kept iff its black + no-data share is at most --max-nodata, counted
    against a direct pixel count; without the flag only declared no-data is skipped."""
    rng = np.random.default_rng(seed)
    h, w, tile = int(rng.integers(180, 320)), int(rng.integers(180, 320)), 60
    d = textured(h, w, seed=seed)
    for _ in range(int(rng.integers(1, 4))):
        r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        d[:, r0:r0 + int(rng.integers(20, h)), c0:c0 + int(rng.integers(20, w))] = 0
    declared = seed % 2 == 1
    if declared:  # a no-data value of 7 in a band-1 stripe: declared no-data, and black is then not no-data
        d[0, :, : w // 5] = 7
    p = write_scene(tmp_path / "s.tif", d, nodata=7 if declared else None)
    max_nodata = float(rng.choice([0.25, 0.5, 0.75]))
    flagged = scan_scene(p, Tiling(tile_size=tile, max_nodata=max_nodata, black_nodata=True))
    plain = scan_scene(p, Tiling(tile_size=tile, max_nodata=max_nodata))
    want_flagged = want_plain = 0
    for r in range(0, h, tile):
        for c in range(0, w, tile):
            win = d[:, r:r + tile, c:c + tile]
            nodata = (win[0] == 7) if declared else np.zeros(win.shape[1:], bool)
            black = (win == 0).all(axis=0) & ~nodata
            want_plain += nodata.mean() <= max_nodata
            want_flagged += (nodata.mean() if declared else black.mean()) <= max_nodata
    # grid cells approximate pixels at tile edges: within one tile of the pixel count
    assert abs(len(plain.items) - want_plain) <= 1 and abs(len(flagged.items) - want_flagged) <= 1
    if declared:  # a raster that declares its no-data: the flag changes nothing
        assert [it.key for it in flagged.items] == [it.key for it in plain.items]
    else:
        assert flagged.skipped_nodata == len(plain.items) - len(flagged.items)
        assert {it.key for it in flagged.items} <= {it.key for it in plain.items}


def test_black_nodata_is_recorded_and_index_add_follows_it(tmp_path, tiny, capsys):
    """The flag goes into the manifest; `index add` cuts new scenes the same way; continuing a build
    with the other setting is refused; the warning names the flag."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder, seed in ((a, 1), (b, 2)):
        d = textured(120, 120, seed=seed)
        d[:, :, :60] = 0  # the left half is undeclared black fill
        write_scene(folder / f"s{seed}.tif", d, transform=from_origin(500000.0 + 1000 * seed, 5000000.0, 1.0, 1.0))
    idx = tmp_path / "idx"
    run_search_cli(["-q", "index", "build", str(a), "--checkpoint", "clip:tiny", "--out", str(idx), "--tile-size", "30",
                    "--black-nodata", "--engine", "torch"], capsys)
    m = B.read_manifest(idx)
    assert m.to_dict()["nodata"] == {"max_fraction": 0.5, "black": True} and m.black_nodata
    assert len(B.read_items(idx, m)) == 8  # 16 tiles of 30 px, the 8 black ones skipped
    run_search_cli(["-q", "index", "add", str(idx), str(b), "--engine", "torch"], capsys)
    assert len(B.read_items(idx, B.read_manifest(idx))) == 16
    with pytest.raises(RsitrError, match="black as no-data"):
        B.build_index(a, "clip:tiny", idx, B.BuildOptions(tile_size=30, progress=False), model=tiny)
    plain = tmp_path / "plain"
    run_search_cli(["-q", "index", "build", str(a), "--checkpoint", "clip:tiny", "--out", str(plain), "--tile-size", "30",
                    "--engine", "torch"], capsys)
    assert len(B.read_items(plain, B.read_manifest(plain))) == 16 and "black" not in B.read_manifest(plain).to_dict()["nodata"]


def test_transform_without_crs_gives_pixel_tiles_and_a_warning(tmp_path, caplog):
    p = tmp_path / "nocrs.tif"
    with rasterio.open(p, "w", driver="GTiff", width=128, height=64, count=3, dtype="uint8",
                       transform=from_origin(1000.0, 2000.0, 1.0, 1.0)) as ds:
        ds.write(textured(64, 128))
    with caplog.at_level(logging.WARNING):
        items = scan_source(p, tiling=Tiling(tile_size=64, meters=(30.0,), out_px=32))
    assert [it.window for it in items] == [[0, 0, 64, 64], [64, 0, 64, 64]]
    assert all(it.wgs84 is None and it.crs is None for it in items)
    assert "has a transform but no CRS" in caplog.text and str(p) in caplog.text


def test_latitude_outside_90_is_an_error_naming_the_file(tmp_path):
    p = write_scene(tmp_path / "pole.tif", textured(64, 64), crs="EPSG:4326", transform=from_origin(10.0, 95.0, 0.1, 0.1))
    with pytest.raises(DataError, match=r"pole\.tif.*latitude"):
        scan_source(p, tile_size=32)


# -- per-scene stretch --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("metres", [True, False])
def test_stretch_is_per_scene(tmp_path, dtype, metres):
    """Two neighbouring tiles of a smooth gradient scene meet with continuous values."""
    x = np.linspace(1000, 3000, 256)[None, None, :] * np.ones((3, 128, 1))
    p = write_scene(tmp_path / "g.tif", x.astype(dtype))
    tiling = Tiling(meters=(128.0,), out_px=128) if metres else Tiling(tile_size=128)
    a, b = scan_source(p, tiling=tiling)
    assert a.window[0] == 0 and b.window[0] == 128
    ra, rb = np.asarray(read_item(a)).astype(int), np.asarray(read_item(b)).astype(int)
    assert abs(ra[:, -1, 0].mean() - rb[:, 0, 0].mean()) <= 3  # a per-tile stretch jumps from 255 to 0 here
    assert ra[:, 0, 0].mean() < 10 and rb[:, -1, 0].mean() > 245  # the scene's 2-98 % range spans both tiles


# -- index build/add ----------------------------------------------------------------------------------
def _two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_scene(a / "s1.tif", textured(200, 240, seed=1))
    write_scene(b / "s2.tif", textured(160, 160, seed=2), transform=from_origin(600000.0, 5000000.0, 1.0, 1.0))
    return a, b


def test_multiscale_index_records_scale_and_add_reuses_the_tiling(tmp_path, tiny, capsys):
    a, b = _two_folders(tmp_path)
    idx = tmp_path / "idx"
    rc, out = run_search_cli(["-q", "index", "build", str(a), "--checkpoint", "clip:tiny", "--out", str(idx), "--tile-meters", "40,80",
                              "--batch-size", "8", "--engine", "torch"], capsys)
    m = B.read_manifest(idx)
    t = m.to_dict()["tiling"]  # as written to manifest.json
    assert t["meters"] == [40.0, 80.0] and t["source"] == "flag" and t["out_px"] == 64 and t["unit"] == "m"
    assert m.to_dict()["nodata"] == {"max_fraction": 0.5} and m.max_nodata == 0.5
    items = B.read_items(idx, m)
    assert {it.extra["scale_m"] for it in items} == {40.0, 80.0}
    assert len([it for it in items if it.extra["scale_m"] == 40.0]) == 30  # 6 x 5 tiles of 40 px
    # `index add` takes no tiling flags: the manifest's metres are reused
    rc, out = run_search_cli(["-q", "index", "add", str(idx), str(b), "--engine", "torch"], capsys)
    items = B.read_items(idx, B.read_manifest(idx))
    new = [it for it in items if it.path.endswith("s2.tif")]
    assert {it.extra["scale_m"] for it in new} == {40.0, 80.0} and len(new) == 16 + 4
    eng = SearchEngine(idx, model=tiny)
    res = eng.search("a river", k=len(items))
    assert {r["scale_m"] for r in res} == {40.0, 80.0} and all(r["scene"] in (0, 1) for r in res)
    rc, out = run_search_cli(["search", str(idx), "a river", "-k", "3", "--json"], capsys)
    assert all(r["scale_m"] in (40.0, 80.0) for r in json.loads(out)["results"])
    # the same --out with other tiling is refused
    with pytest.raises(RsitrError, match="other settings"):
        B.build_index(a, "clip:tiny", idx, B.BuildOptions(tile_meters=(50.0,), progress=False), model=tiny)


def test_a_whole_scene_tile_is_labelled_as_such_not_as_a_full_scale_tile(tmp_path, tiny, capsys):
    """A scene smaller than a scale's tile (the 200 m Manila drone scene in 320 m tiles) gives one tile
    of the whole scene: hits, contact sheet captions and the CLI say so instead of "320 m"."""
    from rsitr.cli.search import format_results
    from rsitr.search.sheet import place_text

    src = tmp_path / "src"
    src.mkdir()
    write_scene(src / "s.tif", textured(300, 300))  # 300 m x 300 m at 1 m
    idx = tmp_path / "idx"
    run_search_cli(["-q", "index", "build", str(src), "--checkpoint", "clip:tiny", "--out", str(idx), "--tile-meters", "100,500",
                    "--batch-size", "8", "--engine", "torch"], capsys)
    res = SearchEngine(idx, model=tiny).search("a river", k=10)
    whole = [r for r in res if r["scale_m"] == 500.0]
    assert len(res) == 10 and len(whole) == 1 and whole[0]["whole_scene"] is True and whole[0]["window"] == [0, 0, 300, 300]
    assert not any(r["whole_scene"] for r in res if r["scale_m"] == 100.0)
    assert place_text(whole[0]).endswith(" · whole scene < 500 m")
    assert all(place_text(r).endswith(" · 100 m") for r in res if r["scale_m"] == 100.0)
    text = format_results(res, "a river")
    assert text.count("whole scene < 500 m tile") == 1 and text.count("  100 m tile") == 9


def test_default_tiling_comes_from_the_model_card(tmp_path, tiny):
    card = tmp_path / "mymodel"
    card.mkdir()
    (card / "card.json").write_text(json.dumps({"format": 1, "name": "mymodel", "weights": {}, "checkpoint": {},
                                                "card": {"ground_tiles_m": [80, 320]}}))
    tiling, source = B.resolve_tiling(B.BuildOptions(auto_meters=True), str(card), tiny.backbone)
    assert tiling.meters == (80.0, 320.0) and source == "card" and tiling.out_px == 64 and "training ground resolution" in tiling.why
    tiling, source = B.resolve_tiling(B.BuildOptions(auto_meters=True), "clip:tiny", tiny.backbone)
    assert tiling.meters is None and tiling.tile_size == 256 and source == "default" and "no card" in tiling.why
    # an explicit --tile-size means pixels whatever the card says
    tiling, source = B.resolve_tiling(B.BuildOptions(tile_size=128), str(card), tiny.backbone)
    assert tiling.meters is None and tiling.tile_size == 128 and source is None


def test_cli_tiling_flags(tmp_path, capsys):
    a, _ = _two_folders(tmp_path)
    with pytest.raises(RsitrError, match="not both"):
        run_search_cli(["index", "build", str(a), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "i"), "--tile-meters", "80",
                        "--tile-size", "64"], capsys)
    with pytest.raises(RsitrError, match="whole pixels"):
        run_search_cli(["index", "build", str(a), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "i"), "--tile-size", "64",
                        "--overlap", "2.5"], capsys)
    with pytest.raises(RsitrError, match="--tile-meters"):
        run_search_cli(["index", "build", str(a), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "i"), "--tile-meters", "80,x"],
                       capsys)


# -- contact sheets and quicklooks --------------------------------------------------------------------
@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny):
    src = tmp_path_factory.mktemp("src")
    d = textured(192, 256, dtype=np.uint16, lo=300, hi=3000)
    d[:, :, :100] = 0
    write_scene(src / "s.tif", d, nodata=0)
    out = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(src, "clip:tiny", out, B.BuildOptions(tile_meters=(64.0,), batch_size=8, progress=False, engine="torch"), model=tiny)
    return out


def test_contact_sheet_has_k_cells(index, tiny, tmp_path):
    eng = SearchEngine(index, model=tiny)
    res = eng.search("a river", k=5)
    assert len(res) == 5
    out = write_contact_sheet(tmp_path / "hits.png", res, eng.item, cell=96, cols=3)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == sheet_size(5, 96, 3)
    for i in range(6):
        x, y = cell_origin(i, 96, 3)
        square = img[y : y + 96, x : x + 96]
        text = img[y + 96 : y + 96 + 40, x : x + 96]
        if i < 5:  # a tile and its caption
            assert (square != 255).any(axis=-1).mean() > 0.5 and (text != 255).any()
        else:  # the 6th slot of the 3 x 2 grid is empty
            assert (square == 255).all() and (text == 255).all()


def test_cli_contact_sheet_and_bad_path(index, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    rc, _ = run_search_cli(["search", str(index), "a river", "-k", "4", "--contact-sheet", str(out)], capsys)
    assert rc == 0 and Image.open(out).size == sheet_size(4, 192, 5)
    (tmp_path / "file").write_text("x")
    from rsitr.utils.io import OutputError

    with pytest.raises(OutputError, match=r"file/s\.png") as exc:  # main() prints an OSError as one line
        run_search_cli(["search", str(index), "a river", "-k", "4", "--contact-sheet", str(tmp_path / "file" / "s.png")], capsys)
    assert "\n" not in str(exc.value)


def test_quicklook_endpoint(index, tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    client = TestClient(create_app(index, engine=SearchEngine(index, model=tiny)))
    r = client.get("/search", params={"q": "a river", "k": 3})
    hit = r.json()["results"][0]
    assert hit["scene"] == 0 and hit["quicklook"] == "/scene/0/quicklook.png" and hit["scale_m"] == 64.0
    assert client.get("/healthz").json()["tiling"] == "64 m tiles"
    info = client.get("/scene/0").json()
    assert (info["width"], info["height"], info["name"]) == (256, 192, "s.tif") and info["tiles"] > 0
    r = client.get("/scene/0/quicklook.png", params={"size": 512})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    ql = np.asarray(Image.open(__import__("io").BytesIO(r.content)).convert("RGB"))
    assert ql.shape == (192, 256, 3)  # never enlarged
    assert (ql[:, :95] == 0).all() and ql[:, 110:].mean() > 30  # no-data black, the scene's own stretch elsewhere
    for bad in ("/scene/7/quicklook.png", "/scene/x/quicklook.png", "/scene/-1", "/scene/99"):
        assert client.get(bad).status_code == 404, bad


# -- the other store and executor -----------------------------------------------------------------------
def _items_json(index_dir):
    return [it.to_json() for it in B.read_items(index_dir, B.read_manifest(index_dir))]


def _metre_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    d = textured(160, 200, dtype=np.uint16, lo=300, hi=3000)
    d[:, :, :50] = 0  # no-data: the first column of 40 m tiles, 5/8 of the first column of 80 m tiles
    write_scene(src / "s.tif", d, nodata=0)
    return src


def test_milvus_store_with_metre_tiles(tmp_path, tiny):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    src = _metre_source(tmp_path)
    o = dict(tile_meters=(40.0, 80.0), batch_size=8, progress=False, engine="torch")
    f = B.build_index(src, "clip:tiny", tmp_path / "faiss", B.BuildOptions(**o), model=tiny)
    m = B.build_index(src, "clip:tiny", tmp_path / "milvus", B.BuildOptions(store="milvus", store_options={"uri": str(tmp_path / "m.db")}, **o),
                      model=tiny)
    assert f.skipped_nodata == m.skipped_nodata == 4 + 2  # four 40 m tiles and two 80 m tiles are mostly no-data
    assert _items_json(tmp_path / "faiss") == _items_json(tmp_path / "milvus")
    eng = SearchEngine(tmp_path / "milvus", model=tiny)
    try:
        res = eng.search("a river", k=4)
        assert {r["scale_m"] for r in res} <= {40.0, 80.0} and all(r["scene"] == 0 for r in res)
        assert eng.quicklook(0, 512)[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        eng.close()


@pytest.mark.slow  # a local Ray (child processes)
def test_ray_build_with_metre_tiles_equals_local(tmp_path, tiny):
    pytest.importorskip("pyarrow")
    pytest.importorskip("ray")
    from rsitr.search import raybuild as R

    src = _metre_source(tmp_path)
    more = tmp_path / "more"
    more.mkdir()
    write_scene(more / "t.tif", textured(80, 80, seed=3), transform=from_origin(600000.0, 5000000.0, 1.0, 1.0))
    o = dict(tile_meters=(40.0, 80.0), batch_size=4, progress=False, engine="torch")
    B.build_index(src, "clip:tiny", tmp_path / "local", B.BuildOptions(**o), model=tiny)
    B.add_to_index(tmp_path / "local", more, B.BuildOptions(progress=False, engine="torch"), model=tiny)
    with R.ray_session(num_cpus=2):
        r = R.build_index_ray(src, "clip:tiny", tmp_path / "ray", B.BuildOptions(**o), R.RayOptions(workers=1, shard_size=5), model=tiny)
        assert r.skipped_nodata == 6
        R.add_to_index_ray(tmp_path / "ray", more, B.BuildOptions(progress=False, engine="torch"), R.RayOptions(workers=1), model=tiny)
    got = _items_json(tmp_path / "ray")
    assert got == _items_json(tmp_path / "local")
    assert {d["extra"]["scale_m"] for d in got if d["path"].endswith("t.tif")} == {40.0, 80.0}
    a, b = (B.read_embeddings(p, B.read_manifest(p)) for p in (tmp_path / "local", tmp_path / "ray"))
    assert np.abs(a - b).max() < 1e-5


def test_scales_too_coarse_for_a_raster_are_left_out():
    """A 10 m scene cut at 80 m would give 8-pixel tiles: that scale is dropped for it (said), the
    320 m scale (32 px) is kept; a scene too coarse for every scale gets one scale of MIN_TILE_PX."""
    import tempfile
    from pathlib import Path

    from rsitr.search.sources import MIN_TILE_PX

    with tempfile.TemporaryDirectory() as d:
        p = write_scene(Path(d) / "s10.tif", textured(200, 200), transform=from_origin(500000.0, 5000000.0, 10.0, 10.0))
        scan = scan_scene(p, Tiling(meters=(80.0, 320.0), out_px=32))
        assert {it.extra["scale_m"] for it in scan.items} == {320.0}
        assert any("80 m tiles would be 8 px" in msg for _, msg in scan.notes)
        scan = scan_scene(p, Tiling(meters=(80.0, 160.0), out_px=32))
        want = math.ceil(MIN_TILE_PX * 10.0 / 10.0) * 10.0
        assert {it.extra["scale_m"] for it in scan.items} == {want}
        assert all(it.window[2] >= MIN_TILE_PX or it.extra.get("whole_scene") for it in scan.items)
