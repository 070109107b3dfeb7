"""HTTP API and web page over a search index (FastAPI). ``create_app(index_dir)`` builds the app.

Routes
------
``GET /healthz``                       liveness + index summary
``GET /search?q=TEXT&k=20&rerank=auto&bbox=W,S,E,N`` text search (JSON); ``q`` 1..500 chars,
                                       ``1 <= k <= 200``; ``bbox`` (optional, WGS84): only tiles whose
                                       footprint intersects it (a bad box is 422); with ``rerank=qbnorm``
                                       the answer's ``qbank`` says which query bank was used (the
                                       index's own, else the shipped model's)
``POST /search/image?k=20&bbox=``      multipart ``file``: an image (png/jpeg/tiff/webp/bmp, <= 20 MB,
                                       <= 100 megapixels), identified from its bytes (the declared
                                       Content-Type is ignored), read as ``rsitr search --image`` reads
                                       a file (float / many-band TIFFs too); see :func:`upload_to_file`
``GET /tiles/{id}?size=256``           JPEG thumbnail of an indexed item (ids only - a request never
                                       names a file; anything that is not an id in range is 404)
``GET /footprints``                    WGS84 boxes of indexed items (the map's context layer)
``GET /scene/{id}``                    a scene (a raster tiles were cut from): name, width, height, tiles
``GET /scene/{id}/quicklook.png?size=1024`` the whole scene downsampled (long side 512, 1024 or 2048 px), with
                                       its own stretch; the page draws the hits' windows on it
                                       (each result names its ``scene`` id, None for whole images)
``GET /``                              the web page (static, no external resources)

With ``token`` set, every route but ``/healthz`` needs it: ``Authorization: Bearer TOKEN``, or the
cookie ``rsitr_token`` that a request with ``?token=TOKEN`` sets (the page: open
``/?token=TOKEN`` once; it redirects to ``/`` so the token leaves the address bar). Anything
else is 401.

Validation errors are 422 (FastAPI's format); a query string over 16 KB is 414 (up to a
4 MB request line; beyond that the HTTP parser refuses it, ``rsitr serve`` sets its limit); a bad upload is 400 (undecodable) / 413 (too
large) / 415 (its bytes are not an image of an accepted format); refused operations (``rerank=sar``, ``ftf`` without tokens, ``qbnorm`` without a query bank)
are 400 with ``{"detail": message}``. Requests are served concurrently from FastAPI's thread
pool; the engine serialises model/FAISS calls with its own lock.
"""
import contextlib
import hmac
import logging
import re
import tempfile
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_QUERY = 500
MAX_K = 200
MAX_UPLOAD = 20 * 1024 * 1024
MAX_PIXELS = 100_000_000  # an upload's pixel limit (the CLI's --max-pixels is for files the user chose)
MAX_REQUEST_LINE = 4 * 1024 * 1024  # the HTTP parser's (h11) limit, set by `rsitr serve`: a request line up to this
                                     # reaches the app, whose middleware answers a long query string with a JSON 414
MAX_QUERY_STRING = 16 * 1024
DECODE_SLOTS = 2  # uploads decoded at the same time (each may take a few hundred MB while decoding)
# formats an upload may have, identified from its bytes (PIL), whatever its declared Content-Type
UPLOAD_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP", "BMP")
MAX_FOOTPRINTS = 20000
THUMB_SIZES = (64, 128, 256, 512)
QUICKLOOK_SIZES = (512, 1024, 2048)
_ID = re.compile(r"[0-9]{1,12}")
TOKEN_COOKIE = "rsitr_token"
OPEN_PATHS = frozenset({"/healthz"})


_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


@contextlib.contextmanager
def upload_to_file(stream, limit: int = MAX_UPLOAD):
    """Copy an upload to a temporary file in 1 MB chunks (at most ``limit`` bytes, else 413) and
    yield its path, named with the suffix of the format its bytes show (the declared Content-Type
    is not trusted); the file is removed afterwards. The image is then read from the file exactly
    as ``rsitr search --image`` reads one, so both accept the same files (float and many-band
    TIFFs through rasterio) and refuse the rest with the same messages. Errors: 400 empty or
    undecodable, 413 too large (bytes or pixels), 415 not an accepted format."""
    from rsitr.data.images import ImageTooLarge, image_size
    from rsitr.utils.errors import DataError

    with tempfile.TemporaryDirectory(prefix="rsitr-upload-") as d:
        raw = Path(d) / "upload"
        size = 0
        with open(raw, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"upload larger than {limit // (1024 * 1024)} MB")
                out.write(chunk)
        if size == 0:
            raise HTTPException(400, "empty upload")
        fmt = upload_format(raw)
        if fmt is None:
            raise HTTPException(415, f"not an image rsitr reads (send one of: {', '.join(f.lower() for f in UPLOAD_FORMATS)})")
        path = raw.rename(raw.with_suffix(_SUFFIX[fmt]))
        try:
            w, h = image_size(path)
        except ImageTooLarge as exc:
            raise HTTPException(413, str(exc).replace(str(path), "upload")) from None
        except DataError as exc:
            raise HTTPException(400, f"a {fmt} image that cannot be decoded: {str(exc).replace(str(path), 'upload')}") from None
        if w * h > MAX_PIXELS:
            raise HTTPException(413, f"image too large ({w}x{h} pixels; at most {MAX_PIXELS:,})")
        try:
            yield path
        except DataError as exc:
            raise HTTPException(400, f"a {fmt} image that cannot be decoded: {str(exc).replace(str(path), 'upload')}") from None


_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}


def upload_format(path: Path) -> str | None:
    """The format of an uploaded file from its bytes: one of :data:`UPLOAD_FORMATS`, else None.
    A TIFF PIL cannot parse (more than 4 bands, float RGB) still counts: rasterio reads those."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=UPLOAD_FORMATS) as im:
            return im.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass
    with open(path, "rb") as fh:
        head = fh.read(4)
    return "TIFF" if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") else None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for this process (``mallopt(M_ARENA_MAX)``; the environment
    variable ``MALLOC_ARENA_MAX`` is only read at start-up). Each server thread otherwise gets an
    arena of its own, and memory freed after a large upload stays in it. No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, int(arenas))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Hand memory freed by a request back to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def create_app(index_dir, *, checkpoint: str | None = None, device: str = "cpu", engine=None, inference: str = "auto",
               store_options: dict | None = None, token: str | None = None):
    """``engine``: an open :class:`SearchEngine` (else one is opened on ``index_dir``);
    ``inference``: its query encoder, ``auto`` | ``onnx`` | ``torch``; ``store_options``: overrides of
    the index's recorded store options that its store allows on a reopen (e.g. another address); ``token``: required by every
    route but ``/healthz`` (see the module doc)."""
    from rsitr.search.engine import SearchEngine

    eng = engine if engine is not None else SearchEngine(index_dir, checkpoint=checkpoint, device=device, engine=inference,
                                                          store_options=store_options)
    app = FastAPI(title="rsitr search", version="1", docs_url="/docs", redoc_url=None)
    app.state.engine = eng
    if token is not None and not token.strip():
        raise RsitrError("--token is empty")

    if token:
        @app.middleware("http")
        async def _require_token(request: Request, call_next):
            if request.url.path in OPEN_PATHS:
                return await call_next(request)
            auth = request.headers.get("authorization", "")
            bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if _same(bearer, token) or _same(request.cookies.get(TOKEN_COOKIE), token):
                return await call_next(request)
            if _same(request.query_params.get("token"), token):
                if request.method == "GET" and request.url.path == "/":
                    response = RedirectResponse("/", status_code=303)  # the token leaves the address bar
                else:
                    response = await call_next(request)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
            return JSONResponse(status_code=401, content={"detail": "this server needs its token: header 'Authorization: Bearer TOKEN', "
                                                                     "or open /?token=TOKEN once in the browser"},
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def _limit_query_string(request: Request, call_next):
        # a request line up to MAX_REQUEST_LINE reaches here; a long query string is 414 with a detail
        if len(request.scope.get("query_string", b"")) > MAX_QUERY_STRING:
            return JSONResponse(status_code=414, content={"detail": f"query string longer than {MAX_QUERY_STRING} bytes"})
        return await call_next(request)

    @app.exception_handler(RsitrError)
    async def _rsitr_error(request: Request, exc: RsitrError):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    def _with_thumbs(results: list[dict]) -> list[dict]:
        for r in results:
            r["thumbnail"] = f"/tiles/{r['id']}"
            r["name"] = Path(r["path"]).name
            if r.get("scene") is not None:
                r["quicklook"] = f"/scene/{r['scene']}/quicklook.png"
        return results

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", **eng.info()}

    def _box(bbox: str | None):
        if bbox is None or not bbox.strip():
            return None
        from rsitr.retrieval.bbox import parse_bbox

        try:
            return parse_bbox(bbox)
        except RsitrError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/search")
    def search(q: str = Query(..., min_length=1, max_length=MAX_QUERY), k: int = Query(20, ge=1, le=MAX_K),
               rerank: Literal["auto", "none", "ftf", "qbnorm", "sar"] = "auto", bbox: str | None = Query(None, max_length=200)):
        if not q.strip():
            raise HTTPException(422, "query is blank")
        box = _box(bbox)
        out = {"query": q, "k": k, "rerank": rerank, "results": _with_thumbs(eng.search(q, k=k, rerank=rerank, bbox=box))}
        if rerank == "qbnorm":
            out["qbank"] = eng.query_bank()[1]["bank"]  # which bank QB-Norm used: the index's own or the shipped model's
        if box is not None:
            out["bbox"] = box.as_list()
        return out

    @app.post("/search/image")
    def search_image(request: Request, file: UploadFile = File(...), k: int = Query(20, ge=1, le=MAX_K),
                     bbox: str | None = Query(None, max_length=200)):
        box = _box(bbox)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD + 64 * 1024:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD // (1024 * 1024)} MB")
        with _decode_slots:  # a bounded number of uploads decoded at once: bounded peak memory
            try:
                with upload_to_file(file.file) as path:
                    results = eng.search_image(path, k=k, bbox=box)
            finally:
                file.file.close()
                release_memory()
        return {"query": f"image:{file.filename or 'upload'}", "k": k, "results": _with_thumbs(results)}

    @app.get("/tiles/{tile_id}")
    def tile(tile_id: str, size: int = Query(256, ge=16, le=1024)):
        # the id is matched as digits only and looked up in the item table: no user text reaches the filesystem
        if not _ID.fullmatch(tile_id) or not 0 <= int(tile_id) < len(eng):
            raise HTTPException(404, "no such tile")
        size = min(THUMB_SIZES, key=lambda s: (s < size, abs(s - size)))  # a few cached sizes only
        try:
            data = eng.thumbnail(int(tile_id), size=size)
        except RsitrError as exc:
            log.warning("tile %s: %s", tile_id, exc)
            raise HTTPException(404, "tile image unavailable") from exc
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/footprints")
    def footprints(limit: int = Query(MAX_FOOTPRINTS, ge=1, le=MAX_FOOTPRINTS)):
        """``[id, west, south, east, north]`` of indexed items with a footprint (map context)."""
        fp = [[it.id, *it.wgs84] for it in eng.items if it.wgs84][:limit]
        return {"count": len(fp), "footprints": fp}

    def _scene_id(scene_id: str) -> int:
        if not _ID.fullmatch(scene_id):
            raise HTTPException(404, "no such scene")
        return int(scene_id)

    @app.get("/scene/{scene_id}")
    def scene(scene_id: str):
        # ids only, looked up in the index's own scene list: no user text reaches the filesystem
        try:
            return eng.scene(_scene_id(scene_id))
        except KeyError:
            raise HTTPException(404, "no such scene") from None
        except RsitrError as exc:
            log.warning("scene %s: %s", scene_id, exc)
            raise HTTPException(404, "scene unavailable") from exc

    @app.get("/scene/{scene_id}/quicklook.png")
    def scene_quicklook(scene_id: str, size: int = Query(QUICKLOOK_SIZES[1], ge=64, le=QUICKLOOK_SIZES[-1])):
        size = min(QUICKLOOK_SIZES, key=lambda s: (s < size, abs(s - size)))  # a few cached sizes only
        try:
            data = eng.quicklook(_scene_id(scene_id), size=size)
        except KeyError:
            raise HTTPException(404, "no such scene") from None
        except RsitrError as exc:
            log.warning("scene %s: %s", scene_id, exc)
            raise HTTPException(404, "scene unavailable") from exc
        return Response(content=data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app
