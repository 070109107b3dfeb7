"""Fuzzing (hypothesis): caption-format parsers, the label reader, the index manifest reader and the
API's query/upload validation. Any input gives a result or one clear error (RsitrError / HTTP
4xx), never another exception, a 500 or a hang (issue 21). Example counts are kept small (CPU)."""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsitr.data.captions import list_formats, load_dataset
from rsitr.data.labels import read_labels_csv
from rsitr.utils.errors import RsitrError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON values drawn near the formats' shapes: their keys, with values of any type
KEYS = ["images", "filename", "split", "sentences", "raw", "tokens", "filepath", "image", "caption", "label_name", "raw_1",
        "sentids", "imgid", "train", "test", "val", "restval", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["train", "val", "test", "restval", "a.png", "../../etc/passwd", "", " ", "test/x.tif", "\x00"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)

CSV_HEADERS = [["filename", "title"], ["image", "caption"], ["image", "caption", "split"], ["file", "text"], ["a", "b"], []]
csv_cells = st.one_of(st.text(max_size=15), st.sampled_from(["train", "test", "val", "x.png", "", "\"", "a,b", "\n", "\ufeff"]))


def _load(path: Path, fmt: str) -> None:
    try:
        ds = load_dataset(path, format=fmt, split="test", check_images=False)
    except RsitrError as exc:
        assert str(exc).strip(), "an error without a message"
        return
    assert all(e.captions for e in ds.entries)


@FUZZ
@given(content=json_values, fmt=st.sampled_from(["auto", *list_formats()]))
def test_json_annotations(content, fmt):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dataset_x.json"
        p.write_text(json.dumps(content), encoding="utf-8")
        _load(p, fmt)


@FUZZ
@given(header=st.sampled_from(CSV_HEADERS), rows=st.lists(st.lists(csv_cells, max_size=4), max_size=6),
       fmt=st.sampled_from(["auto", *list_formats()]))
def test_csv_annotations(header, rows, fmt):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "captions_test.csv"
        buf = io.StringIO()
        w = csv.writer(buf)
        if header:
            w.writerow(header)
        w.writerows(rows)
        p.write_text(buf.getvalue(), encoding="utf-8")
        _load(p, fmt)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".csv", ".txt"]), fmt=st.sampled_from(["auto", *list_formats()]))
def test_annotation_bytes(data, suffix, fmt):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"ann{suffix}"
        p.write_bytes(data)
        _load(p, fmt)


@FUZZ
@given(text=st.one_of(st.binary(max_size=200), st.lists(st.lists(csv_cells, max_size=4), max_size=6)))
def test_label_reader(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "labels.csv"
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            buf = io.StringIO()
            csv.writer(buf).writerows([["filename", "label"], *text])
            p.write_text(buf.getvalue(), encoding="utf-8")
        try:
            out = read_labels_csv(p)
        except RsitrError:
            return
        assert isinstance(out, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


# -- the index manifest -----------------------------------------------------------------------
GOOD = {
    "format": "rsitr-index", "version": 1, "model": {"checkpoint": "clip:tiny", "state_sha256": "0" * 64}, "backbone": {},
    "preprocess": {}, "tiling": {"tile_size": 256, "overlap": 0}, "embed_dim": 128, "index": {"kind": "flat"}, "tokens": False,
    "count": 3, "generation": 1, "sources": [], "files": {"items": "items.000001.jsonl", "embeddings": "embeddings.000001.npy",
                                                          "vectors": "vectors.000001.faiss"},
}
PATHS = [(), ("model",), ("model", "checkpoint"), ("tiling",), ("tiling", "tile_size"), ("tiling", "overlap"), ("index",),
         ("index", "kind"), ("index", "nlist"), ("files",), ("files", "items"), ("files", "tokens"), ("count",), ("embed_dim",),
         ("tokens",), ("generation",), ("sources",), ("format",), ("version",)]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(json_values, st.just("__delete__"))), max_size=3))
def test_manifest_reader(edits):
    import copy

    from rsitr.search.build import read_manifest

    m = copy.deepcopy(GOOD)
    for path, value in edits:
        if not path:
            m = value
            continue
        node = m
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if value == "__delete__":
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
        try:
            got = read_manifest(d)
        except RsitrError as exc:
            assert "\n" not in str(exc)
            return
        # what passed is what the index code relies on
        assert isinstance(got.files, dict) and all("/" not in v and v not in ("..", ".") for v in got.files.values())
        assert isinstance(got.count, int) and got.count >= 0 and got.embed_dim > 0
        assert got.index_kind in ("flat", "ivf", "hnsw") and got.tile_size > got.overlap >= 0


# -- the API -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("faiss")
    from fastapi.testclient import TestClient
    from PIL import Image

    from rsitr.search import build as B
    from rsitr.serve.app import create_app

    src = tmp_path_factory.mktemp("src")
    for i in range(4):
        Image.new("RGB", (32, 32), (50 * i, 80, 20)).save(src / f"t{i}.png")
    out = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(src, "clip:tiny", out, B.BuildOptions(batch_size=8, progress=False))
    return TestClient(create_app(out))  # raise_server_exceptions: a traceback fails the test


query_params = st.fixed_dictionaries({}, optional={
    "q": st.one_of(st.text(max_size=600), st.sampled_from(["", " ", "\x00", "a" * 501, "%", "ships"])),
    "k": st.one_of(st.integers(-3, 500), st.text(max_size=5), st.sampled_from(["1e3", "NaN", "20"])),
    "rerank": st.one_of(st.sampled_from(["none", "ftf", "sar", "", "NONE"]), st.text(max_size=6)),
})


@FUZZ
@given(params=query_params)
def test_api_query_validation(client, params):
    r = client.get("/search", params=params)
    assert r.status_code in (200, 400, 422), (params, r.status_code, r.text[:200])
    if r.status_code == 200:
        body = r.json()
        assert 1 <= len(body["results"]) <= int(params.get("k", 20))
    else:
        assert r.json()["detail"]


def _image_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (9, 99, 199)).save(buf, format=fmt)
    return buf.getvalue()


uploads = st.one_of(
    st.binary(max_size=400),
    st.sampled_from(["PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"]).map(_image_bytes),
    st.tuples(st.sampled_from(["PNG", "JPEG", "TIFF"]).map(_image_bytes), st.integers(1, 200), st.binary(max_size=50))
      .map(lambda t: t[0][: t[1]] + t[2]),  # truncated / corrupted real images
)


@FUZZ
@given(data=uploads, ctype=st.sampled_from(["image/png", "application/octet-stream", "text/plain", "image/gif", ""]),
       k=st.one_of(st.integers(-2, 300), st.just("x")))
def test_api_upload_validation(client, data, ctype, k):
    r = client.post("/search/image", params={"k": k}, files={"file": ("f", data, ctype or "application/octet-stream")})
    assert r.status_code in (200, 400, 413, 415, 422), (r.status_code, r.text[:200])
    if r.status_code != 200:
        assert r.json()["detail"]
