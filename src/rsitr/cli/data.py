"""``rsitr data synth|check``: the synthetic benchmark and the dataset inspection."""
from __future__ import annotations

import argparse
import json

from rsitr.cli.common import add_command
from rsitr.utils.errors import RsitrError


def add_data_check_args(parser: argparse.ArgumentParser) -> None:
    from rsitr.data.captions import FORMATS

    parser.add_argument("path", help="annotation file (Karpathy JSON, PIR/HarMA JSON, iEBAKER CSV, simple CSV) or dataset folder")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="force the annotation format (default: detect)")
    parser.add_argument("--image-root", default=None, help="folder the listed image paths are resolved under")
    parser.add_argument("--split", default=None, choices=("train", "val", "test"),
                        help="split of entries whose annotation names none (e.g. an iEBAKER CSV)")
    parser.add_argument("--labels", default=None, help="scene labels: a CSV path, 'filename', 'ucm-order' or 'none' (default: detect)")
    parser.add_argument("--workers", type=int, default=None, help="threads for the image header checks")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_data_check(args: argparse.Namespace) -> int:
    from rsitr.data.check import check_dataset, exit_code, render_check

    report = check_dataset(args.path, format=args.format, image_root=args.image_root, split=args.split,
                           workers=args.workers, labels=getattr(args, "labels", None))
    print(json.dumps(report, indent=2) if args.json else render_check(report))
    return exit_code(report)


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (images/, labels.csv, dataset_synth.json)")
    parser.add_argument("--images", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same benchmark (default 0)")
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


def add_data_cli(sub) -> None:
    """``rsitr data synth|check`` on ``rsitr``'s subparsers."""
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    add_command(data, "synth", "write the synthetic benchmark (Karpathy JSON + images + labels.csv)", add_synth_args, cmd_data_synth)
    add_command(data, "check", "inspect a caption dataset: format, splits, duplicates, missing images", add_data_check_args, run_data_check)
