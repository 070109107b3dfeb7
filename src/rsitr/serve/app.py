"""HTTP API and web page over a search index (FastAPI). ``create_app(index_dir)`` builds the app.

Routes
------
``GET /healthz``                       liveness + index summary
``GET /search?q=TEXT&k=20&rerank=none&bbox=W,S,E,N`` text search (JSON); ``q`` 1..500 chars,
                                       ``1 <= k <= 200``; ``bbox`` (optional, WGS84): only tiles whose
                                       footprint intersects it (a bad box is 422)
``POST /search/image?k=20&bbox=``      multipart ``file``: an image (png/jpeg/tiff/webp/bmp, <= 20 MB)
``GET /tiles/{id}?size=256``           JPEG thumbnail of an indexed item (ids only - a request never
                                       names a file; anything that is not an id in range is 404)
``GET /footprints``                    WGS84 boxes of indexed items (the map's context layer)
``GET /``                              the web page (static, no external resources)

Validation errors are 422 (FastAPI's format); a bad upload is 400 (undecodable) / 413 (too
large) / 415 (not an image type); refused operations (``rerank=sar``, ``ftf`` without tokens)
are 400 with ``{"detail": message}``. Requests are served concurrently from FastAPI's thread
pool; the engine serialises model/FAISS calls with its own lock.
"""
import io
import logging
import re
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_QUERY = 500
MAX_K = 200
MAX_UPLOAD = 20 * 1024 * 1024
MAX_PIXELS = 100_000_000
UPLOAD_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/tiff", "image/webp", "image/bmp", "image/x-ms-bmp"}
MAX_FOOTPRINTS = 20000
THUMB_SIZES = (64, 128, 256, 512)
_ID = re.compile(r"[0-9]{1,12}")


def create_app(index_dir, *, checkpoint: str | None = None, device: str = "cpu", engine=None, inference: str = "auto",
               milvus_uri: str | None = None):
    """``engine``: an open :class:`SearchEngine` (else one is opened on ``index_dir``);
    ``inference``: its query encoder, ``auto`` | ``onnx`` | ``torch``; ``milvus_uri``: the index's
    Milvus collection at another address than recorded at build time."""
    from rsitr.search.engine import SearchEngine

    eng = engine if engine is not None else SearchEngine(index_dir, checkpoint=checkpoint, device=device, engine=inference,
                                                          milvus_uri=milvus_uri)
    app = FastAPI(title="rsitr search", version="1", docs_url="/docs", redoc_url=None)
    app.state.engine = eng

    @app.exception_handler(RsitrError)
    async def _rsitr_error(request: Request, exc: RsitrError):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    def _with_thumbs(results: list[dict]) -> list[dict]:
        for r in results:
            r["thumbnail"] = f"/tiles/{r['id']}"
            r["name"] = Path(r["path"]).name
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
               rerank: Literal["none", "ftf", "sar"] = "none", bbox: str | None = Query(None, max_length=200)):
        if not q.strip():
            raise HTTPException(422, "query is blank")
        box = _box(bbox)
        out = {"query": q, "k": k, "rerank": rerank, "results": _with_thumbs(eng.search(q, k=k, rerank=rerank, bbox=box))}
        if box is not None:
            out["bbox"] = box.as_list()
        return out

    @app.post("/search/image")
    def search_image(request: Request, file: UploadFile = File(...), k: int = Query(20, ge=1, le=MAX_K),
                     bbox: str | None = Query(None, max_length=200)):
        from PIL import Image, UnidentifiedImageError

        box = _box(bbox)

        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD + 64 * 1024:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD // (1024 * 1024)} MB")
        ctype = (file.content_type or "").split(";")[0].strip().lower()
        if ctype not in UPLOAD_TYPES:
            raise HTTPException(415, f"unsupported upload type {ctype or 'unknown'!r}; send one of {sorted(UPLOAD_TYPES)}")
        data = file.file.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD // (1024 * 1024)} MB")
        if not data:
            raise HTTPException(400, "empty upload")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise HTTPException(400, f"image too large ({im.size[0]}x{im.size[1]} pixels)")
                im.load()
                img = im.convert("RGB")
        except HTTPException:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise HTTPException(400, f"not a readable image ({type(exc).__name__})") from exc
        return {"query": f"image:{file.filename or 'upload'}", "k": k, "results": _with_thumbs(eng.search_image(img, k=k, bbox=box))}

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

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app
