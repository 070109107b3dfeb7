"""A generated corpus of bad input (issue 29): every numeric option of every subcommand (read from
the parser itself), every output flag pointed at a folder / a path under a file, decompression
bombs, truncated / empty / mislabelled images, silent surprises that must now be said. Each ends
in an exit status, one line, no traceback. Most run in this process (``rsitr.cli.main``); a few
in subprocesses prove "no traceback" on a real stderr."""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``rsitr ARGV`` in this process."""
    try:
        code = main(["-q", "--threads", "1", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out = capsys.readouterr()
    return int(code), out.out, out.err


def error_lines(err: str) -> list[str]:
    """The error lines of stderr (argparse's usage block aside)."""
    return [ln for ln in err.splitlines() if "error:" in ln]


def assert_one_error(code: int, err: str, *must: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for m in must:
        assert m in lines[0], (m, lines[0])
    return lines[0]


# -- images -----------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A PNG whose header claims ``w x h`` 1-bit pixels: a few hundred bytes on disk."""
    row = b"\x00" + b"\x00" * ((w + 7) // 8)
    idat = zlib.compress(row * 4, 9)  # a few rows only: the header is what a bomb check reads
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + _chunk(b"IDAT", idat)
                     + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good tiles, an index over them, and every kind of bad image."""
    root = tmp_path_factory.mktemp("corpus")
    good = root / "good"
    good.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (70 * i, 90, 30)).save(good / f"t{i}.png")
    bad = root / "bad"
    bad.mkdir()
    bomb_png(bad / "bomb.png")
    png = (good / "t0.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.jpg").write_bytes(b"not an image at all\n")
    (bad / "png-named.jpg").write_bytes(png)  # wrong extension, good bytes
    idx = root / "idx"
    assert main(["-q", "--threads", "1", "index", "build", str(good), "--checkpoint", "clip:tiny", "--out", str(idx)]) == 0
    blocker = root / "a-file"
    blocker.write_text("x")
    return {"root": root, "good": good, "bad": bad, "idx": idx, "file": blocker}


# -- numeric options, from the parser ---------------------------------------------------------
def _numeric_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, (*path, name))
        elif action.option_strings and getattr(action.type, "kind", None) in (int, float) and action.nargs not in (0,):
            yield path, action


NUMERIC = [(path, a.option_strings[-1], a) for path, a in _numeric_options(build_parser())]


def test_every_numeric_option_is_checked():
    """No ``type=int`` / ``type=float`` is left unchecked anywhere in the parser."""
    unchecked = []

    def walk(p, path=()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sp in a.choices.items():
                    walk(sp, (*path, n))
            elif a.type in (int, float):
                unchecked.append((" ".join(path), a.option_strings))

    walk(build_parser())
    assert not unchecked and len(NUMERIC) > 50, unchecked


# the positional arguments each subcommand needs to get as far as parsing its options
POSITIONALS = {("index", "add"): ["IDX", "SRC"], ("index", "qbank"): ["IDX", "CAPS"], ("index", "build"): ["SRC", "--checkpoint", "x", "--out", "o"],
               ("search",): ["IDX", "q"], ("serve",): ["IDX"], ("eval",): ["--data", "d", "--checkpoint", "c"],
               ("cache", "prune"): [], ("bench", "run"): ["SUITE"], ("bench", "report"): ["DIR"], ("bench", "fuse"): ["A", "B"],
               ("data", "check"): ["D"], ("data", "synth"): ["--out", "o"], ("bench", "encode"): ["--data", "d"]}


@pytest.mark.parametrize("path,flag,action", NUMERIC, ids=[f"{' '.join(p)} {f}" for p, f, _ in NUMERIC])
def test_numeric_option_bad_values(path, flag, action, capsys):
    """-1 (or below the range), nan, text, inf and 10**12 are refused at parse time with the range;
    the lower bound itself is accepted."""
    rng = action.type
    below = str(rng.lo - 1 if rng.kind is int else (rng.lo if rng.lo_open else rng.lo - 1))
    parser = build_parser()
    base = list(path) + POSITIONALS.get(path, [])
    for value in (below, "nan", "text", "inf", "1e400", str(10**12) if rng.hi is not None else None):
        if value is None:
            continue
        with pytest.raises(SystemExit) as info:
            parser.parse_args([*base, flag, value] if flag.startswith("-") and path else [flag, value, *base])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        line = error_lines(err)
        assert len(line) == 1 and flag in line[0] and "must be" in line[0], (value, err)
    ok = str(rng.lo if not rng.lo_open else (rng.lo + 0.5 if rng.hi is None else (rng.lo + rng.hi) / 2))
    try:  # the range's own bound passes (another missing argument may still stop the parse)
        args = parser.parse_args([*base, flag, ok] if path else [flag, ok, *base])
        assert getattr(args, action.dest) is not None
    except SystemExit:
        err = capsys.readouterr().err
        assert f"argument {flag}" not in err and flag not in "".join(error_lines(err)), err


@pytest.mark.parametrize("key,value,msg", [
    ("batch_size", "0", "batch_size: must be >= 1"), ("batch_size", "-4", "batch_size: must be >= 1"),
    ("lr", "-1", "lr: must be > 0"), ("lr", "0", "lr: must be > 0"), ("epochs", "-1", "epochs: must be >= 1"),
    ("epochs", "0", "epochs: must be >= 1"), ("grad_accum", "0", "grad_accum"), ("lr", ".nan", "lr: must be > 0"),
    ("betas", "[0.9, 1.0]", "betas: must be >= 0 and < 1"), ("augment.hflip", "2", "augment.hflip"),
    ("time_budget", "-5", "time_budget: must be > 0"), ("warmup_steps", "-1", "warmup_steps"),
])
def test_train_config_ranges(capsys, tmp_path, key, value, msg):
    code, out, err = run(capsys, ["train", "--data", str(tmp_path / "none.json"), "--set", f"{key}={value}", "--out", str(tmp_path / "run")])
    assert_one_error(code, err, msg)
    assert "trained" not in out
    # the same value given to a suite (`bench run --set`): refused before any cell or dataset
    code, out, err = run(capsys, ["bench", "run", "--suite", "synthetic-quick", "--set", f"{key}={value}", "--out", str(tmp_path / "bench")])
    assert_one_error(code, err, msg)
    assert not (tmp_path / "bench").exists()


def test_train_config_yaml_ranges(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: -1\n")
    code, _, err = run(capsys, ["train", "--config", str(cfg), "--data", "x"])
    assert_one_error(code, err, str(cfg), "epochs: must be >= 1")


def test_resume_on_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, out, err = run(capsys, ["train", "--data", "x", "--resume", "--out", str(tmp_path / "run")])
    assert_one_error(code, err, "--resume", str(tmp_path / "run"), "no checkpoint_last.pt")


# -- output paths ------------------------------------------------------------------------------
def _output_cases(c) -> list[tuple[str, list[str], str]]:
    """(name, argv with OUT in place of the output path, flag): every command that writes."""
    idx, good = str(c["idx"]), str(c["good"])
    return [
        ("index build --out", ["index", "build", good, "--checkpoint", "clip:tiny", "--out", "OUT"], "OUT"),
        ("search --geojson", ["search", idx, "ships", "--geojson", "OUT"], "OUT"),
        ("search --contact-sheet", ["search", idx, "ships", "--contact-sheet", "OUT"], "OUT"),
        ("data synth --out", ["data", "synth", "--out", "OUT", "--images", "4", "--size", "32"], "OUT"),
        ("train --out", ["train", "--data", "DATA", "--backbone", "clip:tiny", "--set", "max_steps=1", "--out", "OUT"], "OUT"),
    ]


@pytest.mark.parametrize("where", ["under-a-file", "a-folder", "an-existing-file"])
@pytest.mark.parametrize("case", range(5))
def test_output_paths(corpus, capsys, tmp_path, where, case):
    """An output path that cannot be written is one line naming it (tests may run as root, where
    chmod does not stop a write: a path under a regular file fails for everyone)."""
    name, argv, _ = _output_cases(corpus)[case]
    is_folder_out = name.endswith("--out") and not name.startswith("search")
    if where == "under-a-file":
        out = corpus["file"] / "sub" / "out"
    elif where == "a-folder":
        if is_folder_out:
            pytest.skip("a folder is what this flag names")
        out = tmp_path / "folder"
        out.mkdir()
    else:
        if not is_folder_out:
            pytest.skip("a file is what this flag names (overwritten)")
        out = corpus["file"]
    if "DATA" in argv:
        from rsitr.data.synth import write_synth

        write_synth(tmp_path / "synth", n_images=6, seed=0, image_size=32)
        argv = [str(tmp_path / "synth" / "dataset_synth.json") if a == "DATA" else a for a in argv]
    argv = [str(out) if a == "OUT" else a for a in argv]
    code, _, err = run(capsys, argv)
    line = assert_one_error(code, err)
    assert str(out) in line or str(corpus["file"]) in line, line


# -- images ------------------------------------------------------------------------------------
def test_bomb_png_is_small(corpus):
    p = corpus["bad"] / "bomb.png"
    assert p.stat().st_size < 10_000
    with Image.open(p) as im:
        assert im.size == (30000, 30000)


@pytest.mark.parametrize("name,must", [
    ("bomb.png", "30000x30000 pixels"), ("truncated.png", "truncated.png"), ("zero.png", "zero.png"), ("text.jpg", "text.jpg"),
])
def test_bad_images_in_build_add_and_search(corpus, capsys, tmp_path, name, must):
    img = corpus["bad"] / name
    single = tmp_path / "one"
    single.mkdir()
    (single / name).write_bytes(img.read_bytes())
    code, _, err = run(capsys, ["index", "build", str(single), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "i1")])
    assert_one_error(code, err, must)
    code, _, err = run(capsys, ["index", "add", str(corpus["idx"]), str(single)])
    assert_one_error(code, err, must)
    code, _, err = run(capsys, ["search", str(corpus["idx"]), "--image", str(single / name)])
    assert_one_error(code, err, must)


def test_bomb_message_names_size_and_limit(corpus, capsys):
    code, _, err = run(capsys, ["search", str(corpus["idx"]), "--image", str(corpus["bad"] / "bomb.png")])
    line = assert_one_error(code, err, "bomb.png", "30000x30000", "900 megapixels", "limit of 400 megapixels", "--max-pixels")
    # a lower limit refuses an ordinary tile the same way; a higher one lets the check pass
    code, _, err = run(capsys, ["--max-pixels", "100", "search", str(corpus["idx"]), "--image", str(corpus["good"] / "t0.png")])
    assert_one_error(code, err, "t0.png", "40x40")
    code, _, err = run(capsys, ["search", str(corpus["idx"]), "--image", str(corpus["good"] / "t0.png")])
    assert code == 0 and "Traceback" not in err
    assert line


def test_skip_bad_counts_and_keeps_building(corpus, capsys, tmp_path, caplog):
    src = tmp_path / "mixed"
    src.mkdir()
    for p in list(corpus["bad"].iterdir()) + [corpus["good"] / "t0.png"]:
        (src / p.name).write_bytes(p.read_bytes())
    with caplog.at_level("WARNING"):
        code, out, err = run(capsys, ["index", "build", str(src), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "i"), "--skip-bad"])
    assert code == 0 and "Traceback" not in err, err
    assert "2 items" in out  # t0.png and the good PNG named .jpg
    summary = [r.getMessage() for r in caplog.records if "--skip-bad: skipped" in r.getMessage()]
    assert summary and "1 over the pixel limit" in summary[0] and "2 unreadable" in summary[0], summary


def test_exif_orientation_is_applied(tmp_path):
    from rsitr.data.images import load_image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (250, 0, 0)  # red left half
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "phone.jpg")
    assert shown.size == (20, 40)  # upright: portrait
    top = np.asarray(shown)[:10].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60, top  # the red half is now on top
    im.save(tmp_path / "plain.jpg", quality=95)
    assert load_image(tmp_path / "plain.jpg").size == (40, 20)


# -- search surprises that are now said ---------------------------------------------------------
def test_search_warnings(corpus, capsys):
    idx = str(corpus["idx"])
    code, out, err = run(capsys, ["search", idx, "ships", "--image", str(corpus["good"] / "t1.png"), "-k", "1"])
    assert code == 0 and "text query 'ships' is ignored" in err
    code, out, err = run(capsys, ["search", idx, "ships", "--bbox", "16,45,14,46", "-k", "1"])
    assert code == 0 and "antimeridian" in err and "--bbox 14,45,16,46" in err
    assert "no item of" in err and "geographic footprint" in err
    code, out, err = run(capsys, ["search", idx, "word " * 10000, "-k", "1"])
    assert code == 0 and "longer than the model's context of 77 tokens" in err
    code, out, err = run(capsys, ["search", idx, "a short query", "-k", "1"])
    assert code == 0 and "warning" not in err


@pytest.mark.parametrize("depth", ["0", "-1"])
def test_rerank_depth(corpus, capsys, depth):
    code, _, err = run(capsys, ["search", str(corpus["idx"]), "ships", "--rerank-depth", depth])
    assert_one_error(code, err, "--rerank-depth", ">= 1")


def test_run_folder_parent_as_checkpoint(tmp_path, capsys, corpus):
    run_dir = tmp_path / "runs" / "demo" / "train"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_best.pt").write_bytes(b"")
    code, _, err = run(capsys, ["index", "build", str(corpus["good"]), "--checkpoint", str(tmp_path / "runs" / "demo"), "--out", str(tmp_path / "i")])
    assert_one_error(code, err, "folder of rsitr runs", str(run_dir))


def test_truncated_embeddings_and_missing_items(corpus, capsys, tmp_path):
    import shutil

    broken = tmp_path / "idx"
    shutil.copytree(corpus["idx"], broken)
    emb = next(broken.glob("embeddings*.npy"))
    emb.write_bytes(emb.read_bytes()[:-64])
    code, _, err = run(capsys, ["search", str(broken), "ships"])
    assert_one_error(code, err)
    shutil.rmtree(broken)
    shutil.copytree(corpus["idx"], broken)
    for p in broken.glob("items*.jsonl"):
        p.unlink()
    code, _, err = run(capsys, ["search", str(broken), "ships"])
    assert_one_error(code, err)


# -- geo rasters ----------------------------------------------------------------------------------
rasterio = pytest.importorskip("rasterio")


def _geotiff(path: Path, *, crs, transform, data: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                       crs=crs, transform=transform) as ds:
        ds.write(data)
    return path


def test_raster_surprises_are_said(tmp_path, caplog):
    from rasterio.transform import from_origin

    from rsitr.search.sources import Item, Tiling, read_item, scan_file
    from rsitr.utils.errors import DataError

    data = np.full((3, 32, 32), 100, np.uint8)
    nocrs = _geotiff(tmp_path / "nocrs.tif", crs=None, transform=from_origin(500000, 4000000, 10, 10), data=data)
    with caplog.at_level("WARNING"):
        items = scan_file(nocrs, 16)
    assert len(items) == 4 and all(it.wgs84 is None for it in items)  # pixel tiles without footprints (issue 27)
    assert any("no CRS" in r.getMessage() for r in caplog.records)
    caplog.clear()
    polar = _geotiff(tmp_path / "polar.tif", crs="EPSG:4326", transform=from_origin(10, 95, 0.1, 0.1), data=data)
    with pytest.raises(DataError, match=r"polar\.tif.*latitude"):  # an error naming the file (issue 27)
        scan_file(polar, 16)
    caplog.clear()
    nan = _geotiff(tmp_path / "nan.tif", crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10),
                   data=np.full((3, 32, 32), np.nan, np.float32))
    with caplog.at_level("WARNING"):
        assert scan_file(nan, 16) == []  # an all-no-data raster is skipped, with a warning naming it
    assert any(str(nan) in r.getMessage() and "every pixel is no-data" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        tiles = scan_file(nan, tiling=Tiling(tile_size=16, max_nodata=None))  # kept when no tile is skipped
        for it in tiles:
            assert not np.asarray(read_item(it)).any()
    said = [r for r in caplog.records if "all no-data" in r.getMessage()]
    assert len(said) == 1, said  # once per file
    assert isinstance(tiles[0], Item)


# -- a few in subprocesses: a real stderr without a traceback -----------------------------------------
@pytest.mark.parametrize("argv,must", [
    (["serve", "IDX", "--port", "70000"], "--port"),
    (["serve", "IDX", "--port", "-1"], "--port"),
    (["search", "IDX", "--image", "BOMB"], "30000x30000"),
    (["search", "IDX", "ships", "--geojson", "FILE/sub/out.geojson"], "out.geojson"),
])
def test_subprocess_no_traceback(corpus, argv, must):
    sub = {"IDX": str(corpus["idx"]), "BOMB": str(corpus["bad"] / "bomb.png"), "FILE": str(corpus["file"])}
    argv = [sub.get(a, a) for a in argv]
    argv = [a.replace("FILE", str(corpus["file"])) for a in argv]
    p = subprocess.run([sys.executable, "-m", "rsitr.cli", "-q", "--threads", "1", *argv], capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and must in lines[0], p.stderr


def test_busy_port_refused_before_serving(corpus):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "rsitr.cli", "-q", "--threads", "1", "serve", str(corpus["idx"]), "--port", str(port)],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "serving" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert_one_error(p.returncode, p.stderr, f"127.0.0.1:{port}", "--port")


# -- HTTP ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(corpus):
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    with TestClient(create_app(corpus["idx"])) as c:
        yield c


def _tiff_bytes(arr: np.ndarray, tmp_path: Path) -> bytes:
    p = tmp_path / "u.tif"
    with rasterio.open(p, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype) as ds:
        ds.write(arr)
    return p.read_bytes()


def test_upload_bomb_is_413_not_500(client, corpus):
    r = client.post("/search/image", files={"file": ("b.png", (corpus["bad"] / "bomb.png").read_bytes(), "image/png")})
    assert r.status_code == 413 and "30000x30000" in r.json()["detail"], r.text
    assert str(corpus["bad"]) not in r.json()["detail"]


@pytest.mark.parametrize("bands,dtype", [(200, np.uint8), (3, np.float32), (1, np.float32), (4, np.uint16)])
def test_upload_accepts_what_search_image_accepts(client, corpus, tmp_path, capsys, bands, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.random((bands, 24, 24)) * (1 if dtype == np.float32 else 200)).astype(dtype)
    data = _tiff_bytes(arr, tmp_path)
    r = client.post("/search/image", params={"k": 1}, files={"file": ("x.tif", data, "application/octet-stream")})
    code, out, err = run(capsys, ["search", str(corpus["idx"]), "--image", str(tmp_path / "u.tif"), "-k", "1", "--json"])
    assert r.status_code == 200 and code == 0, (r.text, err)
    assert r.json()["results"][0]["id"] == json.loads(out)["results"][0]["id"]


def test_long_query_string_is_414(client):
    r = client.get("/search", params={"q": "a" * (20 << 10)})
    assert r.status_code == 414 and "query string" in r.json()["detail"]


def test_two_megabyte_query_string_over_http(corpus):
    """Through a real uvicorn with `rsitr serve`'s parser limit: a 414 with a JSON detail, not a
    connection reset."""
    import socket
    import threading
    import time

    import uvicorn

    from rsitr.serve.app import MAX_REQUEST_LINE, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(corpus["idx"]), host="127.0.0.1", port=port, log_level="error",
                                           h11_max_incomplete_event_size=MAX_REQUEST_LINE))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"GET /search?q=" + b"a" * (2 << 20) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 414"), head[:200]
        assert "query string" in json.loads(body)["detail"]
    finally:
        server.should_exit = True
        t.join(10)
