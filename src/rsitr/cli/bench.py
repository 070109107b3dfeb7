"""``rsitr bench ...``: the argparse of every benchmark (the measurements live in :mod:`rsitr.bench`)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from rsitr.cli.common import add_command
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


def rdb_variants() -> list[str]:
    from rsitr.bench.rdb import SUITE
    from rsitr.bench.suite import find_suite

    return list(yaml.safe_load(find_suite(SUITE).read_text(encoding="utf-8"))["methods"])


def _overrides(pairs: list[str]) -> dict[str, Any]:
    from rsitr.train.config import parse_override

    return dict(parse_override(s) for s in pairs)


def _print_json(obj: Any) -> None:
    from rsitr.utils.io import jsonable

    print(json.dumps(jsonable(obj), indent=2))


# -- suites: run / report, and the ablations built on them ---------------------------------------
def _run_and_report(suite, out: Path, args: argparse.Namespace, *, as_json: bool = False) -> int:
    from rsitr.bench.report import report
    from rsitr.bench.suite import run_suite

    records = run_suite(suite, out, progress=not args.quiet)
    if suite.fuse:
        from rsitr.bench.fuse import fuse_suite

        fuse_suite(suite, out, progress=not args.quiet)
    md = report(out)
    if as_json:
        _print_json(json.loads((out / "report.json").read_text()))
    else:
        print(md)
        print(f"\nreport: {out / 'report.md'}")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


def cmd_run(args: argparse.Namespace) -> int:
    from rsitr.bench.suite import load_suite

    suite = load_suite(args.suite, seeds=args.seeds, methods=args.methods, sets=_overrides(args.set))
    return _run_and_report(suite, Path(args.out or f"runs/bench-{suite.name}"), args)


def cmd_measure(args: argparse.Namespace) -> int:
    from rsitr.bench.report import report
    from rsitr.bench.cell import measure_run

    done = measure_run(Path(args.run_dir), args.measurement, _overrides(args.set), methods=args.methods, again=args.again,
                       progress=not args.quiet)
    report(args.run_dir)  # report.md / report.json carry the new section
    print(f"\nreport: {Path(args.run_dir) / 'report.md'}")
    return 1 if any(d["status"] == "error" for d in done) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from rsitr.bench.report import report

    dirs = list(args.run_dir)
    if len(dirs) > 1 and not args.out:
        raise RsitrError(f"{len(dirs)} run folders: give --out DIR, the folder for their report together")
    if args.out:
        print(report(args.out, sources=dirs))
    else:
        print(report(dirs[0]))
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="+", help="the --out folder of a `rsitr bench run`; several (with --out) are reported as one")
    p.add_argument("--out", help="with several run folders (one `bench run` per seed or method, run side by side): the folder for "
                                 "their report together (refused: the same cell in two folders, seeds of a method with other settings)")


def _alias_suite(name: str, args: argparse.Namespace, *, base: dict[str, Any], options: dict[str, dict[str, Any]],
                 methods: list[str], synth: dict[str, Any], variables: dict[str, str] | None = None):
    """A shipped suite with a bench command's options: ``--data`` (else the suite's synthetic
    benchmark with ``--images``), ``base`` and ``--set`` over the suite's base, ``options`` over its
    per-method options, the ``--seeds``."""
    from rsitr.bench.suite import build_suite, find_suite

    path = find_suite(name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if args.data is not None:
        p = Path(args.data)
        raw["datasets"] = {(p.parent.name if p.is_file() else p.name) or "data": {"data.path": str(p)}}
    else:
        raw["datasets"] = {"synth": {"synth": {"images": args.images, "seed": 0, **synth}}}
    raw["base"] = {**(raw.get("base") or {}), **base, **_overrides(args.set)}
    shared = dict(raw.get("options") or {})
    for m, opts in options.items():
        shared[m] = {**shared.get(m, {}), **opts}
    raw["options"] = shared
    return build_suite(raw, path, seeds=args.seeds, methods=methods, variables=variables)


def cmd_iebaker(args: argparse.Namespace) -> int:
    from rsitr.bench.iebaker import SUITE
    from rsitr.models.registry import parse_spec

    base: dict[str, Any] = {"model.backbone": args.backbone, "epochs": args.epochs, "max_steps": args.max_steps, "time_budget": args.time_budget}
    if args.mode or parse_spec(args.backbone).random_init:
        base["model.mode"] = args.mode or "full"  # nothing pretrained to keep: train everything
    suite = _alias_suite(SUITE, args, base=base, options={"iebaker": _overrides(args.option)}, methods=args.variants,
                         synth={"noise_frac": args.noise_frac})
    return _run_and_report(suite, Path(args.out), args, as_json=args.json)


def cmd_rdb(args: argparse.Namespace) -> int:
    from rsitr.bench.rdb import EXTRA_ROWS, SUITE, default_peft_mode

    mopts: dict[str, dict[str, Any]] = {}
    for s in args.option:
        key, value = _overrides([s]).popitem()
        if "." not in key:
            raise RsitrError(f"--option must look like METHOD.KEY=VALUE (e.g. lora.rank=4), got {s!r}")
        m, k = key.split(".", 1)
        mopts.setdefault(m, {})[k] = value
    base = {"model.backbone": args.backbone, "epochs": args.epochs, "max_steps": args.max_steps, "time_budget": args.time_budget}
    methods = args.variants or [m for m in rdb_variants() if m not in EXTRA_ROWS]
    suite = _alias_suite(SUITE, args, base=base, options=mopts, methods=methods, synth={},
                         variables={"RSITR_PEFT_MODE": args.peft_mode or default_peft_mode(args.backbone)})
    return _run_and_report(suite, Path(args.out), args, as_json=args.json)


# -- measurements on inputs of their own -------------------------------------------------------
def cmd_encode(args: argparse.Namespace) -> int:
    from rsitr.bench.measurements import get_measurement

    m = get_measurement("encode")
    result = m.run(args.backbone, batch_size=args.batch_size, n_batches=args.batches, images=args.images, engines=args.engines,
                   reference=not args.no_reference, progress=not args.quiet)
    _print_json(result["rows"]) if args.json else print(m.render_one(result))
    return 0


def cmd_ftf(args: argparse.Namespace) -> int:
    from rsitr.bench.measurements import get_measurement

    ks = [int(x) for x in str(args.ks).split(",") if x.strip()]
    if not ks or min(ks) < 1:
        raise RsitrError(f"--ks must list positive integers, got {args.ks!r}")
    m = get_measurement("ftf_speed")
    result = m.run(checkpoint=args.checkpoint, data=args.data, split=args.split, synthetic_archive=args.synthetic_archive,
                   tokens=args.tokens, dim=args.dim, words=args.words, queries=args.queries, exhaustive_queries=args.exhaustive_queries,
                   ks=ks, index=args.index, nlist=args.nlist, nprobe=args.nprobe, alpha=args.alpha, tau=args.tau, balance=args.balance,
                   top_n=args.top_n, threads=args.threads, seed=args.seed, out=args.out,
                   synthetic_data=args.synthetic_data)
    _print_json(result) if args.json else print(m.render_one(result))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from rsitr.bench.measurements import get_measurement

    results: dict = {}
    if args.build:
        results["build"] = get_measurement("index_build").run(models=args.model or ("clip:tiny", "towers:efficientnet-lite0+minilm-l6"),
                                                              n_tiles=args.tiles, source=args.source, tta=args.tta,
                                                              batch_size=args.batch_size)
    if not args.no_search:
        results["search"] = get_measurement("vector_search").run(sizes=args.sizes, dim=args.dim, kinds=args.kinds, n_queries=args.queries,
                                                                 k=args.k, data=args.data, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                                                                 ef_search=args.ef_search, threads=args.threads,
                                                                 target_recall=args.target_recall)
    if args.json:
        _print_json({k: v["rows"] for k, v in results.items()})
    else:
        print("\n\n".join(get_measurement({"build": "index_build", "search": "vector_search"}[k]).render_one(v) for k, v in results.items()))
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from rsitr.bench.measurements import write_result
    from rsitr.bench.serve_load import render, run_serve_bench

    from rsitr.bench.serve_load import parse_mix

    out = run_serve_bench(args.index, clients=args.clients, duration=args.duration, warmup=args.warmup, k=args.k, mix=parse_mix(args.mix),
                          engine=args.engine, server_threads=args.server_threads, seed=args.seed, upload=args.upload, idle=args.idle,
                          verbose=getattr(args, "verbose", 0) > 0, progress=not getattr(args, "quiet", False))
    if args.out:
        write_result(args.out, out)
    print(json.dumps(out, indent=2) if args.json else render(out))
    return 0


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    from rsitr.cli.common import add_engine_arg

    p.add_argument("index", help="index folder made by `rsitr index build`; the command serves it itself on 127.0.0.1")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, one connection each (default 32)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of measured load after the warm-up (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (default 5)")
    p.add_argument("-k", type=int, default=20, help="results per query (default 20)")
    p.add_argument("--mix", default=None, metavar="KIND:W,...",
                   help="weights of the request kinds text (GET /search), image (upload of a small tile), thumb (GET /tiles), upload "
                        "(a large file, see --upload), e.g. text:0.5,upload:0.5; or TEXT,IMAGE,THUMB weights (default 0.7,0.1,0.2)")
    p.add_argument("--upload", default=None, metavar="FILE",
                   help="the file of the 'upload' kind (default: a generated 18.75 MB RGB TIFF, just under the 20 MB limit)")
    p.add_argument("--idle", type=float, default=5.0,
                   help="seconds without requests after the load before the last RSS reading (default 5)")
    p.add_argument("--server-threads", type=int, default=None, help="the server's --threads (torch / ONNX Runtime; default: its own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request sequence and of the uploaded tiles (default 0)")
    p.add_argument("--out", default=None, help="also write the figures as JSON to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_engine_arg(p)


# -- the parser --------------------------------------------------------------------------------
def add_ftf_args(p: argparse.ArgumentParser) -> None:
    from rsitr.bench.ftf import DEFAULT_KS

    p.add_argument("--checkpoint", default=None, help="rsitr run dir / checkpoint / backbone spec (with --data)")
    p.add_argument("--data", default=None, help="caption dataset (Karpathy JSON folder or file)")
    p.add_argument("--split", default="test", help="split of --data to query (default test)")
    p.add_argument("--synthetic-archive", type=int, default=None, metavar="N",
                   help="random archive of N images instead of a dataset (latency only)")
    p.add_argument("--synthetic-data", choices=("random", "clustered"), default="random",
                   help="synthetic: i.i.d. random tokens (default; the worst case for an approximate recall index) or images in "
                        "N/100 groups, tokens and query words around their group's centre (as bench search --data clustered)")
    p.add_argument("--tokens", type=int, default=49, help="synthetic: tokens per image")
    p.add_argument("--dim", type=int, default=256, help="synthetic: token/embedding dimension")
    p.add_argument("--words", type=int, default=16, help="synthetic: words per query")
    p.add_argument("--queries", type=int, default=50, help="queries to time (dataset: first N captions; 0 = all)")
    p.add_argument("--exhaustive-queries", type=int, default=None,
                   help="queries for the exhaustive row (default: all for a dataset, 5 for a synthetic archive; 0 = skip)")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="two-stage candidate counts, comma separated")
    p.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw", "auto"],
                   help="recall index: exact (flat), approximate (ivf, hnsw), or auto: what `index build --index-kind auto` builds "
                        "(default flat)")
    p.add_argument("--nlist", type=int, default=None, help="ivf: number of clusters (default: about 4*sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: clusters visited per query (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="final = (1-alpha) coarse + alpha fine (default: checkpoint's, else 0.5)")
    p.add_argument("--tau", type=float, default=None, help="temperature of the word x patch interaction (default: checkpoint's, else 0.1)")
    p.add_argument("--balance", type=float, default=None, help="weight of the text-to-image side of the interaction (default: checkpoint's, else 0.5)")
    p.add_argument("--top-n", type=int, default=None, help="keep only the N largest-norm tokens per image (dataset mode)")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: as configured)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic archive and query sample (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    p.add_argument("--out", default=None, help="also write JSON to this file (and markdown next to it, .md)")




def add_rdb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="caption dataset (default: a synthetic benchmark written under --out/data)")
    p.add_argument("--out", default="runs/bench-rdb", help="run folder: one sub-folder per row and seed, the cache, the table (default runs/bench-rdb)")
    p.add_argument("--images", type=int, default=1000, help="synthetic images when --data is not given")
    p.add_argument("--backbone", default="towers:efficientnet-lite0+minilm-l6",
                   help="backbone of every row (default: the two-tower model; PEFT rows then train the random heads too)")
    p.add_argument("--peft-mode", default=None, help="model.mode of the adapter/lora/rdb rows (default: frozen on clip:, heads otherwise)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per row (default 10)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every row after this many optimizer steps")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per row, trunk caching included (same budget for every row)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every row is trained once per seed (default 0)")
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of: {' '.join(rdb_variants())} (default: all but locked-image)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="method option for every row of that method, e.g. lora.rank=4, rdb.teacher=bank")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override (every row)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="archive sizes (vectors)")
    p.add_argument("--dim", type=int, default=256, help="vector dimension (default 256)")
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw", "auto"],
                   help="index kinds to time (default: flat ivf hnsw; auto: what `index build --index-kind auto` builds, tuned to "
                        "--target-recall). Recall@k against exact search is measured for every kind")
    p.add_argument("--target-recall", type=float, default=0.95, help="kind auto: the recall@k it is tuned to (default 0.95)")
    p.add_argument("--queries", type=int, default=200, help="queries timed per archive (default 200)")
    p.add_argument("-k", type=int, default=10, help="results per query; recall@k against exact search (default 10)")
    p.add_argument("--data", choices=("random", "clustered"), default="random", help="generated vectors: uniform random or clustered (default random)")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: clusters visited per query (default 16)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: neighbours per node (default 32)")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: candidate list size at query time (default 128)")
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads per query (default 1: one query per request; "
                   "index builds use all cores)")
    p.add_argument("--build", action="store_true", help="also measure index-build throughput of --model on generated tiles")
    p.add_argument("--model", action="append", default=None, help="repeatable (default: clip:tiny and towers:efficientnet-lite0+minilm-l6)")
    p.add_argument("--tiles", type=int, default=200, help="--build: generated tiles encoded per model (default 200)")
    p.add_argument("--source", default=None, help="--build: index the first --tiles images of this folder instead of generated tiles")
    p.add_argument("--tta", type=int, choices=(1, 4, 8), default=1, help="--build: test-time views per tile (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="--build: images per encode batch (default 32)")
    p.add_argument("--no-search", action="store_true", help="skip the vector search part")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")


def add_iebaker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="caption dataset (default: a synthetic benchmark with noisy training captions)")
    p.add_argument("--out", default="runs/bench-iebaker", help="run folder: one sub-folder per variant and seed, the cache, the table (default runs/bench-iebaker)")
    p.add_argument("--images", type=int, default=1000, help="synthetic images when --data is not given")
    p.add_argument("--noise-frac", type=float, default=0.3, help="fraction of mismatched synthetic training captions")
    p.add_argument("--backbone", default="towers:efficientnet-lite0+minilm-l6", help="backbone of every variant (default: the two-tower model)")
    p.add_argument("--mode", default=None, help="model.mode: heads | locked-image | full | frozen | top:I,T[+bn] (default: the backbone's choice)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per variant (default 10)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every variant after this many optimizer steps")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per variant, trunk caching included (same budget for every variant)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every variant is trained once per seed (default 0)")
    p.add_argument("--variants", nargs="+", default=None, help="subset of: baseline +EBA +KER +SAR all (the methods of the iebaker-ablation suite)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="iEBAKER option shared by all variants")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")


# -- scale (rsitr.bench.scale) --------------------------------------------------------------------
def add_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=None, help="folder of images to encode (default: the UCM-Captions images at $RSITR_UCM or ../shared/data/ucm-captions)")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N images")
    p.add_argument("--checkpoint", default="towers:efficientnet-lite0+minilm-l6", help="model (default towers:efficientnet-lite0+minilm-l6)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray encoder actors to measure (default 1 2)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode batch (default 32)")
    p.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto", help="inference engine (default auto)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="vector counts for the search part (default 100000)")
    p.add_argument("--kinds", nargs="+", choices=("flat", "ivf", "hnsw"), default=["flat", "hnsw"], help="index kinds (default flat hnsw)")
    p.add_argument("--flat-only-above", type=int, default=200_000,
                   help="sizes above this measure flat only (default 200000: an HNSW build over 1M vectors takes tens of minutes on 2 cores)")
    p.add_argument("--dim", type=int, default=256, help="dimension of the random vectors of the search part (default 256)")
    p.add_argument("--queries", type=int, default=200, help="queries per store and size (default 200)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query; recall@k is measured (default 10)")
    p.add_argument("--no-encode", action="store_true", help="skip the encode part")
    p.add_argument("--no-search", action="store_true", help="skip the search part")
    from rsitr.retrieval.stores import bench_store_kinds

    kinds = bench_store_kinds(available_only=False)
    p.add_argument("--stores", type=_store_list, default=None, metavar="KIND,...",
                   help=f"vector stores measured in the search part, comma-separated, of {', '.join(kinds)} "
                        f"(default: each of them whose optional dependency is installed)")
    for kind in kinds[1:]:  # deprecated --no-KIND of the optional stores (before --stores): leave that store out
        p.add_argument(f"--no-{kind}", dest="no_stores", action="append_const", const=kind, default=[],
                       help=f"deprecated (use --stores): leave the {kind} store out of the search part")
    p.add_argument("--workdir", default=None, help="keep intermediate files here (default: a temporary folder, removed)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="re-render the output of an earlier run (measurements unchanged, projection recomputed); measures nothing")
    p.add_argument("--json", action="store_true", help="print JSON only")


def _store_list(text: str) -> list[str]:
    """``--stores a,b``: the store kinds, in order."""
    return [k.strip() for k in text.split(",") if k.strip()]


def _scale_stores(args: argparse.Namespace) -> list[str] | None:
    """The ``--stores`` of ``bench scale`` (None: the default), less the stores of deprecated ``--no-KIND`` flags."""
    dropped = list(getattr(args, "no_stores", None) or [])
    if not dropped:
        return args.stores
    from rsitr.bench.scale import bench_stores

    log.warning("%s: deprecated, use --stores (e.g. --stores faiss)", " ".join(f"--no-{k}" for k in dropped))
    return [k for k in (args.stores or bench_stores()) if k not in dropped]


def cmd_scale(args: argparse.Namespace) -> int:
    from rsitr.bench.scale import bench_stores, render, rerender, run

    if args.limit is not None and args.limit < 1:
        raise RsitrError(f"--limit must be >= 1, got {args.limit}")
    if any(w < 1 for w in args.workers) or any(n < args.k for n in args.sizes):
        raise RsitrError("--workers must be >= 1 and every --sizes value >= k")
    if args.from_json:  # re-render a run: the measurements as they were, the projection recomputed
        res = rerender(args.from_json, dim=args.dim)
    else:
        stores = None if args.no_search else bench_stores(_scale_stores(args))  # checked before the encode part runs
        res = run(images=args.images, checkpoint=args.checkpoint, limit=args.limit, workers=args.workers, batch_size=args.batch_size,
                  engine=args.engine, sizes=args.sizes, kinds=args.kinds, flat_only_above=args.flat_only_above, dim=args.dim,
                  queries=args.queries, k=args.k, encode=not args.no_encode, search=not args.no_search, stores=stores,
                  workdir=args.workdir, progress=not getattr(args, "quiet", False))
    print(json.dumps(res, indent=1))
    if not args.json:
        print()
        print(render(res, args.k))
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from rsitr.bench.fuse import find_cell, fuse

    if args.merge:
        from rsitr.bench.fuse import merge

        if args.runs or args.suite_dirs or args.members:
            raise RsitrError("--merge takes fuse.json files only, no runs to score")
        results = []
        for f in args.merge:
            try:
                results.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as exc:
                raise RsitrError(f"{f}: not a readable fuse.json ({exc})") from exc
        try:
            res = merge(results)
        except (KeyError, TypeError) as exc:
            raise RsitrError(f"--merge: {', '.join(args.merge)}: not all are fuse.json results of `rsitr bench fuse` (missing {exc})") from exc
        return _fuse_output(res, args)
    if args.runs and (args.suite_dirs or args.members):
        raise RsitrError("give run folders, or --suite-dirs with --members (and --seeds), not both")
    if args.runs:
        # the group is named by its runs (the last two parts of each path: a cell's method/seedN),
        # so the results of several such calls can be merged
        paths = [Path(p).resolve() for p in args.runs]
        groups = {" + ".join(f"{p.parent.name}/{p.name}" for p in paths): [(None, p) for p in paths]}
    elif args.suite_dirs and args.members:
        dirs = [Path(d) for d in args.suite_dirs]
        groups = {f"seed {s}": [(m, find_cell(dirs, m, s, args.dataset)) for m in args.members] for s in args.seeds}
    else:
        raise RsitrError("name the runs to score: RUN [RUN ...], or --suite-dirs DIR [DIR ...] --members M [M ...]")
    if not args.betas or any(b <= 0 for b in args.betas):
        raise RsitrError(f"--betas must be positive numbers, got {args.betas}")
    res = fuse(groups, betas=tuple(args.betas), dynamic=args.dynamic, data=args.data, progress=not args.quiet, choose=args.choose)
    return _fuse_output(res, args)


def _fuse_output(res, args: argparse.Namespace) -> int:
    from rsitr.bench.fuse import render, write_result

    md = write_result(Path(args.out), res) if args.out else render(res)
    if args.json:
        _print_json(res)
    else:
        print(md)
    return 0


def add_fuse_args(p: argparse.ArgumentParser) -> None:
    from rsitr.bench.fuse import BETAS

    p.add_argument("runs", nargs="*", help="run folders or bench cell folders to fuse (one group)")
    p.add_argument("--suite-dirs", nargs="+", default=None, help="`rsitr bench run` folders holding the members' cells")
    p.add_argument("--members", nargs="+", default=None, help="suite rows (methods) to fuse, one cell of each per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds: one group per seed, rows averaged over them (default 0)")
    p.add_argument("--dataset", default=None, help="the suite dataset of the cells (default: any)")
    p.add_argument("--data", default=None, help="score on this dataset instead of the runs' own (needed for runs trained on a mix)")
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS), help=f"QB-Norm temperatures to choose from on val (default {' '.join(f'{b:g}' for b in BETAS)})")
    p.add_argument("--dynamic", action="store_true", help="dynamic inverted softmax (QB-Norm Eq. 4): normalise only queries whose top-1 is in the activation set")
    p.add_argument("--merge", nargs="+", default=None, metavar="FUSE.json",
                   help="no scoring: merge the groups of earlier fuse.json files (e.g. one per seed) into one table")
    p.add_argument("--choose", action="store_true", help="add the row whose members (any subset) and beta score best on val, per group")
    p.add_argument("--out", default=None, help="folder for fuse.json and fuse.md")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown tables")


def cmd_select(args: argparse.Namespace) -> int:
    from rsitr.bench.measurements import write_result
    from rsitr.bench.select import parse_group, render, score_candidates, summarise

    groups = {}
    for text in args.group:
        name, run, files = parse_group(text)
        if name in groups:
            raise RsitrError(f"--group {name} is given twice")
        groups[name] = (run, files)
    cands = score_candidates(groups, data=args.data, rules=args.rules, beta=None if args.no_qbnorm else args.qbnorm_beta, progress=not args.quiet)
    res = summarise(cands, args.rules)
    md = render(res)
    if args.out:
        write_result(Path(args.out) / "select.json", res, md)
    if args.json:
        _print_json(res)
    else:
        print(md)
    return 0


def add_select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", action="append", required=True, metavar="NAME=RUN:GLOB",
                   help="repeatable: one run (seed) and its candidate checkpoints, e.g. s1=runs/joint-s1:runs/epochs/s1-ep*.pt")
    p.add_argument("--data", required=True, help="the dataset to score (e.g. ../shared/data/rsicd)")
    p.add_argument("--rules", nargs="+", default=["val", "val:distinct>=2"],
                   help="selection splits to compare (split specs; default: val and val:distinct>=2)")
    p.add_argument("--qbnorm-beta", type=float, default=14.0, help="QB-Norm beta of the +qb variant (default 14)")
    p.add_argument("--no-qbnorm", action="store_true", help="plain scores only: no query bank is encoded (much faster per checkpoint)")
    p.add_argument("--out", default=None, help="folder for select.json and select.md")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown tables")


def cmd_qbank(args: argparse.Namespace) -> int:
    from rsitr.bench.qbank import bench_qbank, markdown

    checkpoint = args.checkpoint
    if checkpoint is None:
        from rsitr.models.shipped import default_checkpoint

        checkpoint = default_checkpoint()
    res = bench_qbank(checkpoint, args.data, sizes=args.sizes, draws=args.draws, seed=args.seed, beta=args.beta, split=args.split,
                      bank_split=args.bank_split, bank_images=not args.no_bank_images, tolerance=args.tolerance, engine=args.engine,
                      batch_size=args.batch_size, progress=not args.quiet)
    if args.json:
        _print_json(res)
    else:
        print(f"{checkpoint}: QB-Norm bank sizes (beta {res['beta']:g}) on the '{res['split']}' splits, bank: the "
              f"'{res['bank_split']}' splits ({res['bank_captions']} captions)\n")
        print(markdown(res))
    return 0


def add_qbank_args(p: argparse.ArgumentParser) -> None:
    from rsitr.cli.common import add_engine_arg

    p.add_argument("--checkpoint", default=None, help="the model (default: the shipped default model)")
    p.add_argument("--data", action="append", required=True, metavar="[LABEL=]PATH",
                   help="repeatable: a caption dataset; its --split is evaluated, its --bank-split joins the bank")
    p.add_argument("--sizes", type=int, nargs="+", default=[50000, 20000, 10000, 5000, 2000, 1000],
                   help="caption-bank sizes to draw (default 50000 20000 10000 5000 2000 1000; sizes >= the full bank are skipped)")
    p.add_argument("--draws", type=int, default=3, help="random draws per size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first draw (default 0)")
    p.add_argument("--beta", type=float, default=14.0, help="QB-Norm beta (default 14)")
    p.add_argument("--split", default="test", help="evaluated split (default test)")
    p.add_argument("--bank-split", default="train", help="the bank's split (default train)")
    p.add_argument("--no-bank-images", action="store_true", help="encode the bank's captions only (no captions+images rows)")
    p.add_argument("--tolerance", type=float, default=0.1, help="mR a chosen bank may lose against the full caption bank (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128, help="encode batch size (default 128)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    add_engine_arg(p)


def add_bench_cli(sub) -> None:
    """``rsitr bench encode|run|report|iebaker|rdb|ftf|search`` on ``rsitr``'s subparsers."""
    b = sub.add_parser("bench", help="benchmarks that print tables").add_subparsers(dest="bench_command", required=True)
    be = b.add_parser("encode", help="image/text encoding throughput of backbones")
    be.add_argument("--backbone", action="append", required=True, help="repeatable: towers:NAME, clip:ViT-B-32, a checkpoint path")
    be.add_argument("--batch-size", type=int, default=64, help="images / texts per timed batch (default 64)")
    be.add_argument("--batches", type=int, default=5, help="timed batches per implementation; the median is reported (default 5)")
    be.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="CPU threads (as rsitr --threads)")
    be.add_argument("--images", default=None, help="folder of real images to encode (default: the UCM-Captions images when present, else synthetic tiles)")
    be.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"), help="rsitr engines to time")
    be.add_argument("--no-reference", action="store_true", help="skip the reference eager implementations (efficientnet-lite-pytorch, transformers BertModel)")
    be.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    be.set_defaults(func=cmd_encode)
    br = b.add_parser("run", help="run a suite of (dataset x method x seed) cells; finished cells are skipped")
    br.add_argument("--suite", required=True, help="a suite YAML file or a shipped suite name (synthetic-quick, ucm-towers, ...)")
    br.add_argument("--out", default=None, help="run folder (default runs/bench-<suite>)")
    br.add_argument("--seeds", type=int, nargs="+", default=None, help="override the suite's seeds")
    br.add_argument("--methods", nargs="+", default=None, help="run only these methods of the suite")
    br.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="repeatable: a training config key over the suite's base, e.g. model.mode=top:1,3 (a method's own keys still win)")
    br.set_defaults(func=cmd_run)
    add_command(b, "iebaker", "iEBAKER ablation: baseline / +EBA / +KER / +SAR / all, same budget, EBA filter quality", add_iebaker_args,
                cmd_iebaker)
    add_command(b, "ftf", "FTF on one index: coarse vs two-stage (K) vs exhaustive fine scoring, mR and per-query latency", add_ftf_args,
                cmd_ftf)
    add_command(b, "rdb", "RDB comparison: zero-shot / full / adapter / LoRA / RDB and its ablations, same budget", add_rdb_args, cmd_rdb)
    bm = b.add_parser("measure", help="a measurement (e.g. test_time: TTA and QB-Norm) on the finished cells of a run folder that lack it")
    bm.add_argument("run_dir", help="the --out folder of a `rsitr bench run`")
    bm.add_argument("measurement", help="the measurement's name (test_time, params, ...; see rsitr.bench.measurements)")
    bm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter of the measurement (test_time: tta=8, beta=14)")
    bm.add_argument("--methods", nargs="+", default=None, help="only the cells of these methods")
    bm.add_argument("--again", action="store_true", help="measure cells that already have it too")
    bm.set_defaults(func=cmd_measure)
    add_command(b, "report", "markdown + JSON report (and plots) of a bench run folder, or of several as one", _report_args, cmd_report)
    add_command(b, "serve", "the HTTP server under N concurrent clients: req/s, latency percentiles, errors, RSS, answers vs sequence",
                add_serve_bench_args, cmd_serve_bench)
    add_command(b, "search", "vector search latency / recall (flat vs ivf vs hnsw) and index-build throughput", add_search_args, cmd_search)
    add_command(b, "fuse", "score fusion of trained runs (a late combination of methods) and QB-Norm, beta chosen on val, test once",
                add_fuse_args, cmd_fuse)
    add_command(b, "select", "which held-out split (selection rule) picks the checkpoints the test split would pick: Spearman with test, picks, oracle",
                add_select_args, cmd_select)
    add_command(b, "qbank", "QB-Norm query bank size: test mR with the full training-caption bank, random subsamples of it, and none",
                add_qbank_args, cmd_qbank)
    add_command(b, "scale", "past one machine: single-process vs Ray encode, search in each vector store, cost projection",
                add_scale_args, cmd_scale)
