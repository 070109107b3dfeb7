"""``rsitr index build|add``, ``rsitr search``, ``rsitr serve``: registered on ``rsitr``'s subparsers
by :func:`add_cli`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from rsitr.cli.common import add_engine_arg
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _add_build_opts(p: argparse.ArgumentParser, *, tiling: bool) -> None:
    if tiling:
        p.add_argument("--tile-meters", default=None, metavar="M[,M...]",
                       help="cut georeferenced rasters in tiles of M metres on the ground, each read resampled to the model's input "
                            "size; several sizes (60,120,240) make one index over those scales. Default: the sizes the model's card "
                            "gives (its training ground resolution; shipped models), else 256-pixel tiles")
        p.add_argument("--tile-size", type=int, default=None,
                       help="cut georeferenced rasters in tiles of this many pixels instead (given: pixel tiles; default 256 when "
                            "the model has no card and no --tile-meters is given)")
        p.add_argument("--overlap", type=float, default=None,
                       help="shared by neighbouring tiles: metres with metre tiles (below the smallest size), whole pixels with "
                            "pixel tiles (default 0)")
        p.add_argument("--max-nodata", type=float, default=0.5,
                       help="skip tiles whose no-data share (nodata value, alpha 0, NaN) exceeds this fraction (default 0.5)")
        p.add_argument("--black-nodata", action="store_true",
                       help="in rasters that declare no no-data, count pixels that are 0 in every band as no-data (black fill "
                            "around a footprint), as `gdal_edit.py -a_nodata 0` would declare it; recorded in the index, so "
                            "`index add` does the same")
        p.add_argument("--index-kind", choices=("flat", "ivf", "hnsw", "auto"), default="flat",
                       help="vector index: exact (flat), approximate (ivf, hnsw), or auto: flat below 50k vectors, else the fastest "
                            "of IVF (nprobe tuned) and HNSW M 32/48 (efSearch tuned) that reaches --target-recall on jittered copies of "
                            "the index's own vectors, exact search when none does; building the candidates is bounded by a 900 s "
                            "budget (at 1M vectors about a few minutes). Kind, parameters, measured recall and query time, and every "
                            "candidate tried go into the manifest")
        p.add_argument("--target-recall", type=float, default=0.95,
                       help="--index-kind auto: the recall@10 against exact search the tuned index must reach (default 0.95)")
        p.add_argument("--tta", type=int, choices=(1, 4, 8), default=None,
                       help="test-time views per tile: its embedding is the mean over 1, 4 (rotations) or 8 (and mirrors) dihedral views, "
                            "encoded in the same model call; recorded in the manifest (index add uses it). Default: the model card's "
                            "test_time_views_default for shipped:NAME models, else 1")
        p.add_argument("--keep-tokens", action="store_true", help="also store image patch tokens (fp16) for --rerank ftf")
        _add_store_args(p, build=True)
    p.add_argument("--batch-size", type=int, default=32, help="images per encode batch (default 32)")
    p.add_argument("--chunk-size", type=int, default=None, help="items per resumable chunk (default 4 batches)")
    p.add_argument("--skip-bad", action="store_true", help="report and skip unreadable images instead of stopping")
    p.add_argument("--workers", type=int, default=None,
                   help="decode threads (default: the cores, 2..8); they decode and resize ahead while the model encodes")
    p.add_argument("--profile", action="store_true", help="print where the time went: decode, resize, wait, encode, write (seconds, share)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_engine_arg(p)
    # -- executor (rsitr.search.raybuild) --
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data tasks decode, an actor pool encodes, shards are Parquet")
    p.add_argument("--ray-address", default=None, help="--executor ray: join this Ray cluster (default: start a local Ray)")
    p.add_argument("--ray-workers", type=int, default=1, help="--executor ray: encoder actors (default 1)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="--executor ray: CPUs/threads per encoder (default 1)")
    p.add_argument("--shard-size", type=int, default=1024, help="--executor ray: items per Parquet shard, the unit of resume (default 1024)")


def _add_store_args(p: argparse.ArgumentParser, *, build: bool) -> None:
    """The vector store flags (:mod:`rsitr.retrieval.stores`): ``--store`` (build), the generic
    ``--store-opt KEY=VALUE``, and the spelled flags each registered store declares for its options."""
    from rsitr.retrieval.stores import store_flags, store_kinds

    if build:
        kinds = store_kinds()
        p.add_argument("--store", choices=kinds, default=kinds[0],
                       help=f"where the vectors live: {kinds[0]} (files in the index folder, default) or another registered store "
                            f"({', '.join(kinds[1:])})")
    p.add_argument("--store-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the vector store (repeatable)" + ("" if build else
                        "; here: only what the index's store lets a reader override, e.g. its address"))
    for f in store_flags():
        if build or f.reopen:
            p.add_argument(f.flag, dest=_flag_dest(f.flag), default=None, metavar=f.metavar, help=f"{f.help} (= --store-opt {f.key}=...)")


def _flag_dest(flag: str) -> str:
    return "store_flag_" + flag.lstrip("-").replace("-", "_")


def _store_options(args) -> dict:
    """``--store-opt`` pairs and the stores' spelled flags as one ``{key: value}``."""
    from rsitr.retrieval.stores import parse_store_opt_args, store_flags

    out = parse_store_opt_args(getattr(args, "store_opt", None))
    for f in store_flags():
        v = getattr(args, _flag_dest(f.flag), None)
        if v is not None:
            if f.key in out and out[f.key] != v:
                raise RsitrError(f"{f.flag} {v} and --store-opt {f.key}={out[f.key]} disagree")
            out[f.key] = v
    return out


def _ray_opts(args):
    from rsitr.search.raybuild import RayOptions

    return RayOptions(address=args.ray_address, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                      shard_size=args.shard_size)



def _opts(args, **kw):
    from rsitr.search.build import BuildOptions

    if args.workers is not None and args.workers < 1:
        raise RsitrError(f"--workers must be >= 1, got {args.workers}")
    return BuildOptions(batch_size=args.batch_size, chunk_size=args.chunk_size, skip_bad=args.skip_bad, device=args.device,
                        progress=_progress(args), engine=args.engine, workers=args.workers, **kw)


def default_views(checkpoint: str) -> int:
    """``--tta`` when not given: a shipped model's card ``test_time_views_default``, else 1."""
    if str(checkpoint).startswith("shipped:"):
        from rsitr.models.shipped import read_card

        return int(read_card(str(checkpoint).split(":", 1)[1])["card"].get("test_time_views_default", 1))
    return 1


def _print_profile(args, r) -> None:
    """--profile: where the build's time went (at -v the build logs the same line)."""
    if getattr(args, "profile", False) and r.profile and r.encoded:
        from rsitr.search.pipeline import format_profile

        print("time: " + format_profile(r.profile))


def _model_or_default(checkpoint: str | None, what: str) -> str:
    """``--checkpoint``, or the shipped default model (said once); a spec with untrained heads
    is said to be one (issue 27: a pretrained trunk with random heads is no search model)."""
    from rsitr.models.registry import untrained_warning
    from rsitr.models.shipped import default_checkpoint

    if checkpoint is None:
        checkpoint = default_checkpoint()
        print(f"{what}: model {checkpoint} (the shipped default; `rsitr models` lists the shipped models, --checkpoint picks another)",
              file=sys.stderr)
    elif warning := untrained_warning(checkpoint):
        log.warning("%s", warning)
    return checkpoint


def tiling_args(args) -> dict:
    """``--tile-meters`` / ``--tile-size`` / ``--overlap`` / ``--max-nodata`` -> BuildOptions fields
    (explicit --tile-size: pixel tiles; --tile-meters: metres; neither: the model's card decides)."""
    if args.tile_meters is not None and args.tile_size is not None:
        raise RsitrError("give --tile-meters (tiles in metres) or --tile-size (tiles in pixels), not both")
    kw: dict = {"max_nodata": args.max_nodata, "black_nodata": bool(args.black_nodata)}
    if args.tile_meters is not None:
        try:
            meters = tuple(float(v) for v in args.tile_meters.split(",") if v.strip())
        except ValueError:
            raise RsitrError(f"--tile-meters takes sizes in metres separated by commas, e.g. 80,320; got {args.tile_meters!r}") from None
        if not meters:
            raise RsitrError("--tile-meters is empty")
        return {**kw, "tile_meters": meters, "overlap_m": float(args.overlap or 0.0)}
    overlap = args.overlap or 0.0
    if overlap != int(overlap):
        raise RsitrError(f"--overlap is in whole pixels with pixel tiles, got {args.overlap:g}")
    if args.tile_size is not None:
        return {**kw, "tile_size": args.tile_size, "overlap": int(overlap)}
    # neither: metres from the model's card when it has one (else 256-pixel tiles); an --overlap
    # then applies in the unit the tiling turns out to use
    return {**kw, "auto_meters": True, "overlap": int(overlap), "overlap_m": float(overlap)}


def cmd_index_build(args) -> int:
    from rsitr.search.build import build_index

    args.checkpoint = _model_or_default(args.checkpoint, "index build")

    o = _opts(args, index_kind=args.index_kind, keep_tokens=args.keep_tokens, store=args.store, store_options=_store_options(args),
              target_recall=args.target_recall, tta=args.tta if args.tta is not None else default_views(args.checkpoint),
              **tiling_args(args))
    if args.executor == "ray":
        from rsitr.search.raybuild import build_index_ray

        r = build_index_ray(args.source, args.checkpoint, args.out, o, _ray_opts(args))
    else:
        if args.ray_address:
            raise RsitrError("--ray-address applies to --executor ray")
        r = build_index(args.source, args.checkpoint, args.out, o)
    print(f"index {r.index_dir}: {r.total} items ({r.encoded} encoded now, {r.skipped} already done) in {r.seconds:.1f}s"
          + (f", {r.tiles_per_s:.1f} tiles/s encoding, {r.encoded / r.seconds:.1f} tiles/s end to end" if r.encoded else "")
          + _nodata_note(r))
    _print_profile(args, r)
    return 0


def _nodata_note(r) -> str:
    return f"; skipped {r.skipped_nodata} tiles that are mostly no-data" if r.skipped_nodata else ""


def cmd_index_add(args) -> int:
    from rsitr.search.build import add_to_index

    if args.executor == "ray":
        from rsitr.search.raybuild import add_to_index_ray

        r = add_to_index_ray(args.index, args.source, _opts(args), _ray_opts(args), checkpoint=args.checkpoint)
    else:
        r = add_to_index(args.index, args.source, _opts(args), checkpoint=args.checkpoint)
    print(f"index {r.index_dir}: {r.total} items (+{r.added}; {r.skipped} of the source already indexed) in {r.seconds:.1f}s" + _nodata_note(r))
    _print_profile(args, r)
    return 0


def format_results(results: list[dict], query: str) -> str:
    from rsitr.search.sheet import scale_text

    lines = [f"{len(results)} results for {query!r}", f"{'rank':>4}  {'score':>8}  {'id':>6}  path"]
    for r in results:
        where = r["path"] + (f" [x={r['window'][0]} y={r['window'][1]} {r['window'][2]}x{r['window'][3]}]" if r.get("window") else "")
        if r.get("wgs84"):
            w, s, e, n = r["wgs84"]
            where += f"  lon {w:.5f}..{e:.5f} lat {s:.5f}..{n:.5f}"
        if r.get("scale_m"):
            where += f"  {scale_text(r)} tile"
        lines.append(f"{r['rank']:>4}  {r['score']:8.4f}  {r['id']:>6}  {where}")
    return "\n".join(lines)


def _warn_truncated(eng, query: str) -> None:
    """Warn when ``query`` fills the model's whole text context: the words past it are cut off."""
    model = getattr(eng, "model", None)
    if model is None:
        return
    ids = model.tokenize([query])
    if ids.shape[-1] and int(ids[0, -1]) != 0:  # no padding left: the tokenizer cut the text at its context length
        print(f"warning: the query is longer than the model's context of {ids.shape[-1]} tokens: only its beginning is used "
              f"({len(query.split())} words given)", file=sys.stderr)


def cmd_search(args) -> int:
    from rsitr.search.engine import SearchEngine

    if args.image is None and not args.query:
        raise RsitrError("give a text query or --image PATH")
    if args.k < 1:
        raise RsitrError(f"-k must be >= 1, got {args.k}")
    if args.image is not None and args.query:
        print(f"warning: --image given: the text query {args.query!r} is ignored (search with one or the other)", file=sys.stderr)
    box, bank_note = None, None
    if args.bbox is not None:
        from rsitr.retrieval.bbox import parse_bbox

        box = parse_bbox(args.bbox)  # before loading anything: a bad box is one line
        if box.crosses_antimeridian:
            print(f"warning: --bbox {args.bbox}: west ({box.west:g}) > east ({box.east:g}) is read as a box crossing the antimeridian "
                  f"(lon {box.west:g}..180 and -180..{box.east:g}); for the box between them pass "
                  f"--bbox {box.east:g},{box.south:g},{box.west:g},{box.north:g}", file=sys.stderr)
    eng = SearchEngine(args.index, checkpoint=args.checkpoint, device=args.device, engine=args.engine, store_options=_store_options(args))
    try:
        if box is not None and not eng.has_geo:
            print(f"warning: --bbox: no item of {args.index} has a geographic footprint (only georeferenced rasters have one), "
                  "so no result can match the box", file=sys.stderr)
        if args.image is not None:
            if args.rerank not in ("auto", "none"):
                raise RsitrError("--rerank applies to text queries only")
            query = f"image:{args.image}"
            results = eng.search_image(args.image, k=args.k, bbox=box)
        else:
            query = args.query
            _warn_truncated(eng, query)
            results = eng.search(args.query, k=args.k, rerank=args.rerank, rerank_depth=args.rerank_depth, bbox=box)
            if args.rerank == "qbnorm":
                bank_note = eng.query_bank()[1]["bank"]
                print(f"QB-Norm over {bank_note}", file=sys.stderr)
        if args.contact_sheet:
            from rsitr.search.sheet import write_contact_sheet

            write_contact_sheet(args.contact_sheet, results, eng.item)
            log.info("wrote a contact sheet of %d hits to %s", len(results), args.contact_sheet)
    finally:
        eng.close()
    if args.geojson:
        from rsitr.search.geo import write_geojson

        n = write_geojson(args.geojson, results, query)
        log.info("wrote %d footprints to %s", n, args.geojson)
        if n == 0:
            print(f"note: no result has a geographic footprint; {args.geojson} has an empty FeatureCollection", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": query, "k": args.k, "rerank": args.rerank, "bbox": box.as_list() if box else None,
                          **({"qbank": bank_note} if bank_note else {}), "results": results}, indent=1))
    else:
        print(format_results(results, query) + (f"\n(only tiles whose footprint intersects {box})" if box else ""))
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_token(args) -> str | None:
    """``--token``, else ``$RSITR_TOKEN``; warns when a non-loopback host is served without one."""
    import os

    token = args.token if args.token is not None else os.environ.get("RSITR_TOKEN") or None
    if token is not None and not token.strip():
        raise RsitrError("--token is empty")
    if token is None and args.host not in LOOPBACK:
        print(f"warning: serving on {args.host} without --token: anyone who can reach port {args.port} can search this index "
              "and read its images (pass --token T, or set RSITR_TOKEN)", file=sys.stderr)
    return token


def check_port_free(host: str, port: int) -> None:
    """Refuse, before anything is loaded or announced, a port another process listens on (or that
    this user may not bind)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RsitrError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed socket in TIME_WAIT is not "busy"
        try:
            s.bind(addr)
        except OSError as exc:
            raise RsitrError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server on that port? pick one with --port)") from None


def cmd_serve(args) -> int:
    import uvicorn

    from rsitr.serve.app import create_app

    token = serve_token(args)
    check_port_free(args.host, args.port)
    app = create_app(args.index, checkpoint=args.checkpoint, device=args.device, inference=args.engine, store_options=_store_options(args),
                     token=token)
    print(f"serving {args.index} on http://{args.host}:{args.port}/" + (" (token required; open /?token=... once in a browser)" if token else ""),
          file=sys.stderr)
    from rsitr.serve.app import MAX_REQUEST_LINE, limit_malloc_arenas

    limit_malloc_arenas()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if getattr(args, "quiet", False) else "info",
                h11_max_incomplete_event_size=MAX_REQUEST_LINE)
    return 0


def cmd_index_qbank(args: argparse.Namespace) -> int:
    from rsitr.search.qbank import DEFAULT_BETA, build_query_bank

    meta = build_query_bank(args.index, args.captions, split=args.split, beta=DEFAULT_BETA if args.beta is None else args.beta,
                            batch_size=args.batch_size, engine=args.engine, progress=_progress(args))
    print(f"query bank of {args.index}: {meta['count']} captions of {meta['source']} [{meta['split']}], beta {meta['beta']:g}")
    return 0


def add_cli(sub) -> None:
    """Register ``index build|add``, ``search`` and ``serve`` on ``rsitr.cli``'s subparsers."""
    ix = sub.add_parser("index", help="build / grow a search index over images or GeoTIFF scenes").add_subparsers(dest="index_command", required=True)
    b = ix.add_parser("build", help="encode a folder of images / GeoTIFF scenes into an index (re-run to resume)")
    b.add_argument("source", help="folder (recursive) or file: jpg/png/tif; georeferenced rasters are tiled")
    b.add_argument("--checkpoint", default=None,
                   help="model: shipped:NAME (default: the shipped default model, see `rsitr models`), an rsitr run folder or "
                        "checkpoint, a CLIP checkpoint; towers:NAME / clip:NAME have untrained heads (warned: no search model)")
    b.add_argument("--out", required=True, help="index folder")
    _add_build_opts(b, tiling=True)
    b.set_defaults(func=cmd_index_build)
    a = ix.add_parser("add", help="add the images of SOURCE not yet in the index")
    a.add_argument("index", help="index folder made by `rsitr index build`")
    a.add_argument("source", help="folder (recursive) or file: jpg/png/tif; georeferenced rasters are tiled as the index records")
    a.add_argument("--checkpoint", default=None, help="the index's model at another path (default: as recorded)")
    _add_build_opts(a, tiling=False)
    a.set_defaults(func=cmd_index_add)
    q = ix.add_parser("qbank", help="store a query bank for `search --rerank qbnorm` (QB-Norm): captions encoded by the index's model")
    q.add_argument("index", help="index folder made by `rsitr index build`")
    q.add_argument("captions", help="caption dataset (any format rsitr reads), e.g. the model's training data")
    q.add_argument("--split", default="train", help="its split to use, or 'all' (default train)")
    q.add_argument("--beta", type=float, default=None, help="QB-Norm temperature (default 14: chosen on RSICD val)")
    q.add_argument("--batch-size", type=int, default=256, help="captions per encode batch (default 256)")
    add_engine_arg(q)
    q.set_defaults(func=cmd_index_qbank)

    s = sub.add_parser("search", help="search an index with a sentence (or an image)")
    s.add_argument("index", help="index folder made by `rsitr index build`")
    s.add_argument("query", nargs="?", default=None, help="the sentence to search for (or give --image)")
    s.add_argument("-k", type=int, default=20, help="number of results (default 20)")
    s.add_argument("--rerank", choices=("auto", "none", "ftf", "qbnorm"), default="auto",
                   help="auto (default): rank as the checkpoint's method ranks in `rsitr eval` (FTF's two-stage rerank and "
                        "iEBAKER's local mix need an index built with --keep-tokens; what cannot be applied is warned about once); "
                        "none: the pooled-cosine order; "
                        "ftf: re-score the top candidates with FTF's word x patch interaction (index built with --keep-tokens); "
                        "qbnorm: re-rank them by QB-Norm over the index's query bank (`rsitr index qbank`), else over the query bank "
                        "a shipped model brings (`rsitr models show NAME`); which bank is said on stderr. "
                        "SAR is not offered: it re-ranks with the reverse direction over a set of queries, which one free-text "
                        "search does not have (use `rsitr eval --rerank sar`)")
    s.add_argument("--rerank-depth", type=int, default=100,
                   help="candidates reranked (default 100; with auto, FTF's two-stage uses its own k)")
    s.add_argument("--image", default=None, help="query with an image file instead: tiles that look like it")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--geojson", default=None, metavar="OUT", help="write the result footprints (WGS84) as a GeoJSON FeatureCollection")
    s.add_argument("--contact-sheet", default=None, metavar="OUT.png",
                   help="write the hits' tiles as one PNG grid, each with its rank, score, file and place (lat/lon and tile size, "
                        "or pixel window)")
    s.add_argument("--checkpoint", default=None, help="the index's model at another path (default: as recorded)")
    s.add_argument("--bbox", default=None, metavar="W,S,E,N",
                   help="only tiles whose WGS84 footprint intersects this box (degrees; W > E crosses the antimeridian)")
    _add_store_args(s, build=False)
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_engine_arg(s)
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("serve", help="HTTP API + web page over an index")
    v.add_argument("index", help="index folder made by `rsitr index build`")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "another address without --token prints a warning)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    v.add_argument("--token", default=None, help="require this token on every route but /healthz: header 'Authorization: Bearer T', "
                   "or open /?token=T once in a browser (sets a cookie); default $RSITR_TOKEN")
    v.add_argument("--checkpoint", default=None, help="the index's model at another path (default: as recorded)")
    _add_store_args(v, build=False)
    v.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_engine_arg(v)
    v.set_defaults(func=cmd_serve)
