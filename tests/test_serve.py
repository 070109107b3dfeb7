"""HTTP API: search, uploads, thumbnails, validation, path traversal, concurrency."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("rasterio")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from rsitr.search import build as B  # noqa: E402
from rsitr.bench.search import write_sample_source  # noqa: E402
from rsitr.serve.app import MAX_UPLOAD, create_app  # noqa: E402

TILE = 64


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    src = write_sample_source(tmp_path_factory.mktemp("src"), n_png=3, grid=(2, 2), tile=TILE)
    out = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(src, "clip:tiny", out, B.BuildOptions(tile_size=TILE, batch_size=8, progress=False))
    return out


@pytest.fixture(scope="module")
def client(index):
    return TestClient(create_app(index))


def _png(size=(40, 40), color=(30, 120, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_healthz_and_page(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["items"] == 7 and h["geo"] is True and h["tokens"] is False
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert 'id="q"' in r.text and "<svg" in r.text and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")  # no CDN
    fp = client.get("/footprints").json()
    assert fp["count"] == 4 and len(fp["footprints"][0]) == 5


def test_search(client):
    r = client.get("/search", params={"q": "a harbour with ships", "k": 5})
    assert r.status_code == 200
    body = r.json()
    res = body["results"]
    assert body["query"] == "a harbour with ships" and len(res) == 5
    assert [x["rank"] for x in res] == [1, 2, 3, 4, 5]
    assert all(x["thumbnail"] == f"/tiles/{x['id']}" for x in res)
    assert [x["score"] for x in res] == sorted((x["score"] for x in res), reverse=True)
    assert len(client.get("/search", params={"q": "x", "k": 200}).json()["results"]) == 7


@pytest.mark.parametrize("params", [
    {"q": "", "k": 5}, {"q": "a" * 501}, {"q": "   "}, {"q": "ok", "k": 0}, {"q": "ok", "k": 201}, {"q": "ok", "k": "ten"},
    {"k": 5}, {"q": "ok", "rerank": "magic"},
])
def test_search_validation(client, params):
    assert client.get("/search", params=params).status_code == 422


def test_search_limits_accepted(client):
    assert client.get("/search", params={"q": "a" * 500, "k": 1}).status_code == 200


def test_refused_reranks_are_400(client):
    r = client.get("/search", params={"q": "x", "rerank": "sar"})
    assert r.status_code == 400 and "query set" in r.json()["detail"]
    r = client.get("/search", params={"q": "x", "rerank": "ftf"})
    assert r.status_code == 400 and "--keep-tokens" in r.json()["detail"]
    r = client.get("/search", params={"q": "x", "rerank": "qbnorm"})
    assert r.status_code == 400 and "rsitr index qbank" in r.json()["detail"]


def test_tiles(client):
    r = client.get("/tiles/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) <= 256
    assert client.get("/tiles/6", params={"size": 64}).status_code == 200
    assert client.get("/tiles/0", params={"size": 5000}).status_code == 422


@pytest.mark.parametrize("path", [
    "/tiles/7", "/tiles/99999999", "/tiles/-1", "/tiles/1.0", "/tiles/0x1", "/tiles/%2e%2e%2fmanifest.json",
    "/tiles/..%2F..%2Fetc%2Fpasswd", "/tiles/../../etc/passwd", "/tiles/%2Fetc%2Fpasswd", "/tiles/manifest.json",
    "/tiles/1%00", "/tiles/" + "9" * 40,
])
def test_tile_ids_are_validated(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert b"root:" not in r.content


def test_image_upload(client, index):
    r = client.post("/search/image", params={"k": 3}, files={"file": ("q.png", _png(), "image/png")})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    items = B.read_items(index, B.read_manifest(index))
    own = next(it.path for it in items if it.path.endswith(".png"))
    with open(own, "rb") as fh:
        r = client.post("/search/image", params={"k": 1}, files={"file": ("same.png", fh.read(), "image/png")})
    assert r.json()["results"][0]["path"] == own


@pytest.mark.parametrize("name,data,ctype,status", [
    ("a.txt", b"hello", "text/plain", 415),
    ("a.svg", b"<svg/>", "image/svg+xml", 415),
    ("a.png", b"not really a png", "image/png", 415),  # identified from the bytes, not the declared type
    ("a.png", b"", "image/png", 400),
    ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png", 415),  # a PNG signature without a valid header: not identified
    ("a.gif", b"GIF89a" + b"\0" * 40, "image/gif", 415),  # an image, but not a format rsitr accepts
])
def test_bad_uploads(client, name, data, ctype, status):
    assert client.post("/search/image", files={"file": (name, data, ctype)}).status_code == status


def test_upload_identified_by_bytes(client, index):
    """curl -F file=@tile.tif sends application/octet-stream: a real tile is accepted whatever its
    declared type, and a truncated one is 400, not a traceback."""
    items = B.read_items(index, B.read_manifest(index))
    own = next(it.path for it in items if it.path.endswith(".png"))
    data = open(own, "rb").read()
    for ctype in ("application/octet-stream", "text/plain", "image/jpeg"):
        r = client.post("/search/image", params={"k": 1}, files={"file": ("tile", data, ctype)})
        assert r.status_code == 200, (ctype, r.text)
        assert r.json()["results"][0]["path"] == own
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 10, 10)).save(buf, format="TIFF")
    r = client.post("/search/image", files={"file": ("t.tif", buf.getvalue(), "application/octet-stream")})
    assert r.status_code == 200
    r = client.post("/search/image", files={"file": ("t.png", data[: len(data) // 2], "application/octet-stream")})
    assert r.status_code == 400 and "cannot be decoded" in r.json()["detail"]


def test_upload_too_large(client):
    big = _png() + b"\0" * (MAX_UPLOAD + 1)
    assert client.post("/search/image", files={"file": ("big.png", big, "image/png")}).status_code == 413


def test_upload_validation(client):
    assert client.post("/search/image").status_code == 422
    assert client.post("/search/image", params={"k": 0}, files={"file": ("q.png", _png(), "image/png")}).status_code == 422


def test_concurrent_requests(client):
    queries = [f"query number {i}" for i in range(6)]
    want = {q: client.get("/search", params={"q": q, "k": 4}).json()["results"] for q in queries}

    def one(i):
        q = queries[i % len(queries)]
        if i % 3 == 2:
            return ("tile", client.get(f"/tiles/{i % 7}").status_code)
        return (q, client.get("/search", params={"q": q, "k": 4}).json()["results"])

    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(one, range(24)))
    for key, val in got:
        if key == "tile":
            assert val == 200
        else:
            assert [r["id"] for r in val] == [r["id"] for r in want[key]]
            assert [r["score"] for r in val] == pytest.approx([r["score"] for r in want[key]], abs=1e-5)


def test_token_required_everywhere_but_healthz(index):
    from rsitr.serve.app import TOKEN_COOKIE

    app = create_app(index, token="s3cret")
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        for method, path, kw in [("get", "/", {}), ("get", "/search?q=ships", {}), ("get", "/tiles/0", {}), ("get", "/footprints", {}),
                                 ("get", "/docs", {}), ("get", "/openapi.json", {}),
                                 ("post", "/search/image", {"files": {"file": ("q.png", _png(), "image/png")}})]:
            r = getattr(c, method)(path, **kw)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            for bad in ({"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
                assert getattr(c, method)(path, headers=bad, **kw).status_code == 401, (path, bad)
            assert getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}, **kw).status_code == 200, path
        assert c.get("/search", params={"q": "ships", "token": "nope"}).status_code == 401
        assert not c.cookies
    # the page: ?token=T once sets the cookie and redirects to a URL without the token
    with TestClient(app) as c:
        r = c.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert TOKEN_COOKIE in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
        c.cookies.set(TOKEN_COOKIE, "s3cret")
        assert c.get("/").status_code == 200
        assert c.get("/search", params={"q": "ships"}).status_code == 200
        assert c.get("/tiles/1").status_code == 200
    with TestClient(app) as c:
        c.cookies.set(TOKEN_COOKIE, "forged")
        assert c.get("/search", params={"q": "ships"}).status_code == 401


def test_serve_warns_without_token_off_loopback(capsys, monkeypatch):
    import argparse

    from rsitr.cli.search import serve_token
    from rsitr.utils.errors import RsitrError

    monkeypatch.delenv("RSITR_TOKEN", raising=False)
    assert serve_token(argparse.Namespace(token=None, host="0.0.0.0", port=8000)) is None
    assert "without --token" in capsys.readouterr().err
    assert serve_token(argparse.Namespace(token="T", host="0.0.0.0", port=8000)) == "T"
    assert serve_token(argparse.Namespace(token=None, host="127.0.0.1", port=8000)) is None
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RSITR_TOKEN", "fromenv")
    assert serve_token(argparse.Namespace(token=None, host="0.0.0.0", port=8000)) == "fromenv"
    assert capsys.readouterr().err == ""
    with pytest.raises(RsitrError):
        serve_token(argparse.Namespace(token=" ", host="0.0.0.0", port=8000))
