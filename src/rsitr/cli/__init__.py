"""``rsitr`` command line: one entry point, subcommands per stage of the pipeline.

    rsitr demo                      synthetic benchmark -> zero-shot -> train -> metrics table
    rsitr data synth|check          make the synthetic benchmark / inspect a caption dataset
    rsitr train --config C.yaml     train a method (YAML config + key=value overrides)
    rsitr eval --data D --checkpoint M
    rsitr bench encode|run|report|iebaker|rdb|ftf|search
    rsitr index build|add, rsitr search, rsitr serve   search your own imagery
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rsitr.utils.errors import RsitrError

log = logging.getLogger("rsitr")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="annotation file (Karpathy JSON, PIR/HarMA JSON, iEBAKER CSV, simple CSV) or dataset folder")
    p.add_argument("--format", default="auto", help="force the annotation format (default: detect)")
    p.add_argument("--image-root", default=None, help="folder the listed image paths are resolved under")
    p.add_argument("--labels", default=None, help="scene labels: a CSV path, 'filename', 'ucm-order' or 'none' (default: detect)")
    p.add_argument("--skip-bad", action="store_true", help="report and skip bad entries instead of stopping")


def add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto",
                   help="no-grad encoder: ONNX Runtime (auto: where installed) or eager torch; same results within 1e-4")


def _add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (images/, labels.csv, dataset_synth.json)")
    parser.add_argument("--images", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-frac", type=float, default=0.0, help="fraction of train captions replaced by weakly related ones (marked noisy)")
    parser.add_argument("--size", type=int, default=128, help="tile size in pixels (default 128)")
    parser.add_argument("--splits", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--workers", type=int, default=None, help="drawing threads (default: CPU count, at most 8)")


def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from rsitr.data.synth import CLASSES, write_synth

    try:
        splits = tuple(float(v) for v in str(args.splits).split(","))
    except ValueError:
        raise RsitrError(f"--splits: expected three comma-separated fractions, got {args.splits!r}") from None
    if len(splits) != 3:
        raise RsitrError(f"--splits: expected three comma-separated fractions, got {args.splits!r}")
    t0 = time.perf_counter()
    try:
        ann = write_synth(args.out, n_images=args.images, seed=args.seed, noise_frac=args.noise_frac, image_size=args.size,
                          splits=splits, workers=args.workers, progress=not getattr(args, "quiet", False))  # type: ignore[arg-type]
    except ValueError as exc:
        raise RsitrError(str(exc)) from None
    print(f"wrote {args.images} synthetic images ({len(CLASSES)} classes, {args.size}px) and {ann} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rsitr.data.captions import load_dataset
    from rsitr.models.registry import load_model
    from rsitr.retrieval.evaluate import evaluate
    from rsitr.retrieval.metrics import format_table

    # entries whose annotation names no split (iEBAKER CSV rows...) are taken as the evaluated split
    data = load_dataset(args.data, format=args.format, image_root=args.image_root, labels=args.labels, skip_bad=args.skip_bad, split=args.split)
    split = data.split(args.split)
    if len(split) == 0:
        raise RsitrError(f"{args.data}: split '{args.split}' is empty (splits present: {data.splits})")
    model = load_model(args.checkpoint, device=args.device, quick_gelu=args.quick_gelu)
    method = model.__dict__.get("method")
    if args.rerank == "sar" and method is not None and bool(getattr(method, "sar_enabled", False)):
        log.warning("the checkpoint's iEBAKER method already applies SAR; --rerank sar applies it a second time")
    from rsitr.models.engine import engine_for

    engine = engine_for(model, args.engine)
    metrics = evaluate(model, split, batch_size=args.batch_size, workers=args.workers, device=args.device, progress=not args.quiet,
                       ties=args.ties, rerank=args.rerank, rerank_options={"k": args.rerank_k} if args.rerank == "sar" else None, engine=engine)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
                          "images": len(split), "captions": split.n_captions, "rerank": args.rerank, **metrics}, indent=2))
    else:
        print(format_table(metrics, title=f"{args.checkpoint} on {args.data} [{args.split}: {len(split)} images, {split.n_captions} captions]"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rsitr.train.config import TrainConfig, parse_override
    from rsitr.train.loop import train
    from rsitr.retrieval.metrics import format_table

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = dict(parse_override(s) for s in args.set)
    for flag, key in (("data", "data.path"), ("out", "out_dir"), ("backbone", "model.backbone"), ("mode", "model.mode"),
                      ("method", "method.name"), ("epochs", "epochs"), ("seed", "seed"), ("image_root", "data.image_root"), ("format", "data.format")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    cfg = cfg.override(overrides)
    if not cfg.data.path:
        raise RsitrError("no dataset: give --data PATH or data.path in the config")
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(f"trained {result.trainable_params:,} / {result.total_params:,} parameters in {result.seconds:.1f}s; run folder {result.out_dir}")
    if result.best.get("epoch", -1) >= 0 and "mR" in result.best:
        print(format_table({k: result.best[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR") if k in result.best},
                           title=f"best validation (epoch {result.best['epoch']})"))
    if result.test:
        print(format_table(result.test, title="test (best checkpoint)"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rsitr.demo import run_demo

    return run_demo(out=Path(args.out), images=args.images, seed=args.seed, backbone=args.backbone, epochs=args.epochs,
                    mode=args.mode, json_out=args.json, progress=not args.quiet, time_budget=args.time_budget)


def cmd_bench_encode(args: argparse.Namespace) -> int:
    from rsitr.bench.throughput import encode_comparison, render

    rows = [r for b in args.backbone for r in encode_comparison(b, batch_size=args.batch_size, n_batches=args.batches, images=args.images,
                                                               engines=args.engines, reference=not args.no_reference, progress=not args.quiet)]
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


def cmd_bench_run(args: argparse.Namespace) -> int:
    from rsitr.bench.report import report
    from rsitr.bench.suite import load_suite, run_suite

    suite = load_suite(args.suite, seeds=args.seeds, methods=args.methods)
    out = Path(args.out or f"runs/bench-{suite.name}")
    records = run_suite(suite, out, progress=not args.quiet)
    print(report(out))
    print(f"\nreport: {out / 'report.md'}")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


def cmd_bench_iebaker(args: argparse.Namespace) -> int:
    from rsitr.bench.iebaker import format_markdown, run_ablation
    from rsitr.train.config import parse_override

    data = args.data
    if data is None:
        from rsitr.data.synth import bench_dataset

        data = bench_dataset(args.out, args.images, noise_frac=args.noise_frac, progress=not args.quiet)
    opts = dict(parse_override(s) for s in args.option)
    rows = run_ablation(data, args.out, args.backbone, epochs=args.epochs, max_steps=args.max_steps, time_budget=args.time_budget,
                        seeds=args.seeds, variants=args.variants, options=opts, overrides=dict(parse_override(s) for s in args.set),
                        mode=args.mode, progress=not args.quiet)
    print(json.dumps(rows, indent=2, default=str) if args.json else format_markdown(rows))
    return 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from rsitr.bench.report import report

    print(report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rsitr import __version__

    p = argparse.ArgumentParser(prog="rsitr", description="Remote-sensing image-text retrieval")
    p.add_argument("--version", action="version", version=f"rsitr {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch and ONNX Runtime (default: torch's, i.e. the cores)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job on the embedded default: synthetic data, small pretrained model, before/after table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--images", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backbone", default="towers:efficientnet-lite0+minilm-l6")
    d.add_argument("--mode", default=None, help="what trains (default: the backbone's demo choice)")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds (same-budget comparisons)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write the synthetic benchmark (Karpathy JSON + images + labels.csv)")
    _add_synth_args(s)
    s.set_defaults(func=cmd_data_synth)
    from rsitr.data.check import add_data_check_args, run_data_check

    c = data.add_parser("check", help="inspect a caption dataset: format, splits, duplicates, missing images")
    add_data_check_args(c)
    c.set_defaults(func=run_data_check)

    e = sub.add_parser("eval", help="evaluate a model on a dataset split (the field's protocol)")
    _add_data_args(e)
    e.add_argument("--checkpoint", required=True, help="CLIP checkpoint, HF CLIP folder, rsitr run/checkpoint, or towers:NAME")
    e.add_argument("--split", default="test", help="split to evaluate; also the split of entries whose annotation has none")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None, help="CLIP activation override for open_clip state dicts")
    e.add_argument("--ties", choices=("expected", "optimistic", "pessimistic"), default="expected",
                   help="how exact score ties count (repeated captions tie exactly); see rsitr.retrieval.metrics")
    e.add_argument("--rerank", choices=("none", "sar"), default="none",
                   help="re-rank the score matrix: sar = iEBAKER's Sort After Reversed retrieval (any model)")
    e.add_argument("--rerank-k", type=int, default=10, help="SAR candidate depth per query (both directions)")
    add_engine_arg(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train a method from a YAML config (override any key with --set key=value)")
    t.add_argument("--config", default=None)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--data", default=None)
    t.add_argument("--image-root", default=None)
    t.add_argument("--format", default=None)
    t.add_argument("--out", default=None)
    t.add_argument("--backbone", default=None)
    t.add_argument("--mode", default=None)
    t.add_argument("--method", default=None)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="benchmarks that print tables").add_subparsers(dest="bench_command", required=True)
    be = b.add_parser("encode", help="image/text encoding throughput of backbones")
    be.add_argument("--backbone", action="append", required=True, help="repeatable: towers:NAME, clip:ViT-B-32, a checkpoint path")
    be.add_argument("--batch-size", type=int, default=64)
    be.add_argument("--batches", type=int, default=5)
    be.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="CPU threads (as rsitr --threads)")
    be.add_argument("--images", default=None, help="folder of real images to encode (default: the UCM-Captions images when present, else synthetic tiles)")
    be.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"), help="rsitr engines to time")
    be.add_argument("--no-reference", action="store_true", help="skip the reference eager implementations (efficientnet-lite-pytorch, transformers BertModel)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench_encode)
    br = b.add_parser("run", help="run a suite of (dataset x method x seed) cells; finished cells are skipped")
    br.add_argument("--suite", required=True, help="a suite YAML file or a shipped suite name (synthetic-quick, ucm-towers, ...)")
    br.add_argument("--out", default=None, help="run folder (default runs/bench-<suite>)")
    br.add_argument("--seeds", type=int, nargs="+", default=None, help="override the suite's seeds")
    br.add_argument("--methods", nargs="+", default=None, help="run only these methods of the suite")
    br.set_defaults(func=cmd_bench_run)
    bi = b.add_parser("iebaker", help="iEBAKER ablation: baseline / +EBA / +KER / +SAR / all, same budget, EBA filter quality")
    bi.add_argument("--data", default=None, help="caption dataset (default: a synthetic benchmark with noisy training captions)")
    bi.add_argument("--out", default="runs/bench-iebaker")
    bi.add_argument("--images", type=int, default=1000, help="synthetic images when --data is not given")
    bi.add_argument("--noise-frac", type=float, default=0.3, help="fraction of mismatched synthetic training captions")
    bi.add_argument("--backbone", default="towers:efficientnet-lite0+minilm-l6")
    bi.add_argument("--mode", default=None)
    bi.add_argument("--epochs", type=int, default=10)
    bi.add_argument("--max-steps", type=int, default=None)
    bi.add_argument("--time-budget", type=float, default=None)
    bi.add_argument("--seeds", type=int, nargs="+", default=[0])
    bi.add_argument("--variants", nargs="+", default=None, help="subset of: baseline +EBA +KER +SAR all")
    bi.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="iEBAKER option shared by all variants")
    bi.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    bi.add_argument("--json", action="store_true")
    bi.set_defaults(func=cmd_bench_iebaker)
    from rsitr.bench.ftf import add_args as add_ftf_args, run_cli as run_ftf

    bf = b.add_parser("ftf", help="FTF on one index: coarse vs two-stage (K) vs exhaustive fine scoring, mR and per-query latency")
    add_ftf_args(bf)
    bf.set_defaults(func=run_ftf)
    from rsitr.bench.rdb import add_args as add_rdb_args, run_cli as run_rdb

    brd = b.add_parser("rdb", help="RDB comparison: zero-shot / full / adapter / LoRA / RDB and its ablations, same budget")
    add_rdb_args(brd)
    brd.set_defaults(func=run_rdb)
    bp = b.add_parser("report", help="markdown + JSON report (and plots) of a bench run folder")
    bp.add_argument("run_dir")
    bp.set_defaults(func=cmd_bench_report)
    from rsitr.search.cli import add_bench_cli, add_cli

    add_cli(sub)  # index build / index add / search / serve
    add_bench_cli(b)  # bench search
    return p


def main(argv: list[str] | None = None) -> int:
    from rsitr.utils.logging import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except RsitrError as exc:
        print(f"rsitr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rsitr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
