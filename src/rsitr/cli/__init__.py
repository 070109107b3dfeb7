"""``rsitr`` command line: one entry point, subcommands per stage of the pipeline.

    rsitr demo                      synthetic benchmark -> zero-shot -> train -> metrics table
    rsitr data synth|check          make the synthetic benchmark / inspect a caption dataset
    rsitr train --config C.yaml     train a method (YAML config + key=value overrides)
    rsitr eval --data D --checkpoint M
    rsitr bench encode|run|report|iebaker|rdb|ftf|search
    rsitr index build|add, rsitr search, rsitr serve   search your own imagery

All argparse lives in this package (the top layer): :mod:`.data`, :mod:`.bench`, :mod:`.search`
and :mod:`.demo` register their subcommands here; ``rsitr = "rsitr.cli:main"`` and
``python -m rsitr.cli`` run :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from rsitr.utils.errors import RsitrError

log = logging.getLogger("rsitr")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="annotation file (Karpathy JSON, PIR/HarMA JSON, iEBAKER CSV, simple CSV) or dataset folder")
    p.add_argument("--format", default="auto", help="force the annotation format (default: detect)")
    p.add_argument("--image-root", default=None, help="folder the listed image paths are resolved under")
    p.add_argument("--labels", default=None, help="scene labels: a CSV path, 'filename', 'ucm-order' or 'none' (default: detect)")
    p.add_argument("--skip-bad", action="store_true", help="report and skip bad entries instead of stopping")


def cmd_eval(args: argparse.Namespace) -> int:
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import evaluate
    from rsitr.methods.factory import load
    from rsitr.retrieval.metrics import format_table

    # entries whose annotation names no split (iEBAKER CSV rows...) are taken as the evaluated split
    data = load_dataset(args.data, format=args.format, image_root=args.image_root, labels=args.labels, skip_bad=args.skip_bad, split=args.split.partition(":")[0])
    split = data.split(args.split)
    if len(split) == 0:
        raise RsitrError(f"{args.data}: split '{args.split}' is empty (splits present: {data.splits})")
    if args.checkpoint is None:
        from rsitr.models.shipped import default_checkpoint

        args.checkpoint = default_checkpoint()
        print(f"eval: model {args.checkpoint} (the shipped default; --checkpoint picks another)", file=sys.stderr)
    else:
        from rsitr.models.registry import untrained_warning

        if warning := untrained_warning(args.checkpoint):
            log.warning("%s", warning)
    model = load(args.checkpoint, device=args.device, quick_gelu=args.quick_gelu)
    if args.rerank != "none" and model.method is not None and model.method.capabilities.reranker == args.rerank:
        log.warning("the checkpoint's method already applies %s; --rerank %s applies it a second time", args.rerank.upper(), args.rerank)
    from rsitr.models.engine import engine_for

    engine = engine_for(model.backbone, args.engine)
    rerank_options = {"k": args.rerank_k} if args.rerank == "sar" else None
    if args.rerank == "qbnorm":
        from rsitr.eval.evaluate import QBNormBank

        if args.qbnorm_bank == "shipped":
            from rsitr.models.shipped import query_bank_of

            got = query_bank_of(args.checkpoint)
            if got is None:
                raise RsitrError(f"--qbnorm-bank shipped: the model {args.checkpoint} ships no query bank (a shipped model's "
                                 f"card lists it: `rsitr models show NAME`); name a split of --data instead")
            log.info("QB-Norm over the shipped query bank of %s: %d training captions (text->image only)", got[0], got[2]["count"])
            qb = QBNormBank(None, beta=args.qbnorm_beta, dynamic=args.qbnorm_dynamic, texts=got[1])
        else:
            bank = data.split(args.qbnorm_bank)
            if len(bank) == 0:
                raise RsitrError(f"{args.data}: the QB-Norm bank split '{args.qbnorm_bank}' is empty (splits present: {data.splits}); "
                                 f"--qbnorm-bank names the split whose captions and images form the query bank "
                                 f"(or 'shipped': a shipped model's own bank)")
            if args.qbnorm_bank == args.split:
                raise RsitrError(f"--qbnorm-bank {args.qbnorm_bank} is the evaluated split: QB-Norm's bank must be other queries "
                                 f"(the model's training split)")
            qb = QBNormBank(bank, beta=args.qbnorm_beta, dynamic=args.qbnorm_dynamic)
        caps = model.method.capabilities if model.method is not None else None
        if caps is not None and not caps.cosine:
            log.warning("--rerank qbnorm ranks the pooled cosine; the checkpoint method's own scoring is not applied")
        rerank_options = {"qbnorm": qb}
    metrics = evaluate(model.backbone, split, method=model.method, batch_size=args.batch_size, workers=args.workers, device=args.device,
                       progress=not args.quiet, ties=args.ties, rerank=args.rerank, rerank_options=rerank_options, engine=engine,
                       tta=args.tta)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
                          "images": len(split), "captions": split.n_captions, "rerank": args.rerank, "tta": args.tta,
                          **({"qbnorm_beta": args.qbnorm_beta, "qbnorm_bank": args.qbnorm_bank} if args.rerank == "qbnorm" else {}),
                          **metrics}, indent=2))
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
    if args.teacher:
        overrides["distill.teachers"] = list(args.teacher)
    cfg = cfg.override(overrides)
    if not cfg.data.path and not cfg.data.sources:
        raise RsitrError("no dataset: give --data PATH, or data.path or data.sources in the config")
    if args.resume:
        from pathlib import Path

        if not (Path(cfg.out_dir) / "checkpoint_last.pt").is_file():
            raise RsitrError(f"--resume: {cfg.out_dir} holds no run to continue (no checkpoint_last.pt); "
                             "drop --resume to start a new run there, or give the run folder with --out")
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(f"trained {result.trainable_params:,} / {result.total_params:,} parameters in {result.seconds:.1f}s; run folder {result.out_dir}")
    if result.budget_stopped:
        print(f"time_budget={cfg.time_budget:g} s stopped training after {result.steps} of {result.planned_steps} steps", file=sys.stderr)
    if result.best.get("epoch", -1) >= 0 and "mR" in result.best:
        print(format_table({k: result.best[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR") if k in result.best},
                           title=f"best validation (epoch {result.best['epoch']})"))
    if result.test:
        print(format_table(result.test, title="test (best checkpoint)"))
    from rsitr.cli.common import undertrained

    if undertrained(result, cfg.time_budget):
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rsitr.utils.version import __version__

    p = argparse.ArgumentParser(prog="rsitr", description="Remote-sensing image-text retrieval")
    p.add_argument("--version", action="version", version=f"rsitr {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug log output (the default level is info; -q: warnings only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch and ONNX Runtime, in every process rsitr starts for the command (bench run's cells too; default: torch's, i.e. the cores)")
    from rsitr.data.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse plain images (PNG/JPEG/non-georeferenced TIFF...) with more pixels than this, before decoding them "
                        f"(default {DEFAULT_MAX_PIXELS:,}); with --skip-bad they are skipped and counted. Georeferenced rasters are "
                        "read tile by tile and have no limit")
    sub = p.add_subparsers(dest="command", required=True)

    from rsitr.cli.bench import add_bench_cli
    from rsitr.cli.cache import add_cache_cli
    from rsitr.cli.common import add_engine_arg
    from rsitr.cli.data import add_data_cli
    from rsitr.cli.demo import add_demo_cli
    from rsitr.cli.models import add_models_cli
    from rsitr.cli.search import add_cli as add_search_cli

    add_demo_cli(sub)
    add_models_cli(sub)
    add_data_cli(sub)
    e = sub.add_parser("eval", help="evaluate a model on a dataset split (the field's protocol)")
    _add_data_args(e)
    e.add_argument("--checkpoint", default=None,
                   help="shipped:NAME (default: the shipped default model), rsitr run/checkpoint, CLIP checkpoint, HF CLIP folder, or towers:NAME")
    e.add_argument("--split", default="test", help="split to evaluate (train+val joins; val:distinct>=2 keeps the images with >= 2 distinct captions, drawn like RSICD's test); also the split of entries whose annotation has none")
    e.add_argument("--batch-size", type=int, default=128, help="images / captions per encode batch (default 128)")
    e.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0: in the main process)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None, help="CLIP activation override for open_clip state dicts")
    e.add_argument("--ties", choices=("expected", "optimistic", "pessimistic"), default="expected",
                   help="how exact score ties count (repeated captions tie exactly); see rsitr.retrieval.metrics")
    e.add_argument("--rerank", choices=("none", "sar", "qbnorm"), default="none",
                   help="re-rank the score matrix: none (default) = the checkpoint's method scores each direction by its own "
                        "matrix, as the bench's cells do; sar = iEBAKER's Sort After Reversed retrieval (any model); qbnorm = QB-Norm "
                        "(Bogolin et al. 2022) over the --qbnorm-bank split's captions and images (any model; pooled cosine)")
    e.add_argument("--rerank-k", type=int, default=10, help="SAR candidate depth per query (both directions)")
    e.add_argument("--qbnorm-bank", default="train",
                   help="the split whose captions/images are QB-Norm's query bank (default train), or 'shipped': the query bank "
                        "a shipped model brings (a sample of its training captions; normalises text->image only)")
    e.add_argument("--qbnorm-beta", type=float, default=14.0,
                   help="QB-Norm inverse temperature (default 14: the beta RSICD's val chose for 13 of 15 runs)")
    e.add_argument("--qbnorm-dynamic", action="store_true", help="QB-Norm's dynamic inverted softmax (their Eq. 4)")
    e.add_argument("--tta", type=int, choices=(1, 4, 8), default=1,
                   help="test-time augmentation: each image's embedding averaged over 1, 4 (rotations) or 8 (and mirrors) "
                        "dihedral views; both directions use the averaged embedding (default 1)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_engine_arg(e)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train a method from a YAML config (override any key with --set key=value)")
    t.add_argument("--config", default=None, help="YAML config (src/rsitr/configs/*.yaml); default: TrainConfig's defaults")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, repeatable: --set lr=1e-4 --set time_budget=600 (seconds for the whole run, "
                        "trunk caching included) --set method.options.k=5")
    t.add_argument("--data", default=None, help="annotation file or dataset folder (= data.path)")
    t.add_argument("--image-root", default=None, help="folder the listed image paths are resolved under (= data.image_root)")
    t.add_argument("--format", default=None, help="force the annotation format (= data.format; default: detect)")
    t.add_argument("--out", default=None, help="run folder: checkpoints, log.jsonl, result.json (= out_dir)")
    t.add_argument("--backbone", default=None, help="towers:NAME, clip:NAME or a CLIP checkpoint path (= model.backbone)")
    t.add_argument("--mode", default=None, help="what trains: heads | locked-image | full | frozen | top:I,T[+bn] (two-tower: last I image stages, last T text layers) (= model.mode)")
    t.add_argument("--method", default=None, help="baseline | rdb | iebaker | ftf | combo | adapter | lora ... (= method.name)")
    t.add_argument("--epochs", type=int, default=None, help="training epochs (= epochs)")
    t.add_argument("--seed", type=int, default=None, help="random seed (= seed)")
    t.add_argument("--teacher", action="append", default=None, metavar="RUN",
                   help="distil this trained run folder (or checkpoint) into the student, repeatable (= distill.teachers; "
                        "it must share the student's backbone and model.mode cut; see docs/training.md, Distillation)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.set_defaults(func=cmd_train)

    add_bench_cli(sub)
    add_search_cli(sub)  # index build / index add / search / serve
    add_cache_cli(sub)
    from rsitr.cli.common import check_numeric_options

    check_numeric_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from rsitr.utils.logging import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    from rsitr.data.images import set_max_pixels

    set_max_pixels(args.max_pixels)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except RsitrError as exc:
        print(f"rsitr: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a file the command writes (or reads) cannot be: --out on a read-only file system, a
        # --geojson that is a folder... One line naming the path, whatever layer raised it
        print(f"rsitr: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rsitr: interrupted", file=sys.stderr)
        return 130


def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` of an OSError (both paths of a rename), on one line; an
    :class:`~rsitr.utils.io.OutputError` as its own message."""
    from rsitr.utils.io import OutputError

    if isinstance(exc, OutputError):
        return str(exc)
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    if not paths:
        return f"{reason} ({type(exc).__name__})".replace("\n", " ")
    return f"{' -> '.join(paths)}: {reason}".replace("\n", " ")
