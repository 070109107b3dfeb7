"""``rsitr demo``: the main job on the embedded default: synthetic benchmark -> before -> train -> after."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rsitr.utils.io import atomic_write_json

log = logging.getLogger(__name__)

# what trains by default, by what the backbone declares: one with a cacheable trunk/head split
# (the two-tower model) is trained LiT-style (pretrained trunks locked, heads trained on cached
# features); one without (CLIP, e.g. a random-init clip:tiny) trains everything.
DEMO_DEFAULTS = {
    "split": {"mode": "heads", "epochs": 30, "lr": 2e-3, "batch_size": 128, "warmup_steps": 20, "weight_decay": 0.05},
    "whole": {"mode": "full", "epochs": 20, "lr": 5e-4, "batch_size": 64, "warmup_steps": 50, "weight_decay": 0.1},
}


def run_demo(out: Path, images: int = 1000, seed: int = 0, backbone: str = "towers:efficientnet-lite0+minilm-l6", epochs: int | None = None,
             mode: str | None = None, json_out: bool = False, progress: bool = True, time_budget: float | None = None) -> int:
    from rsitr.data.captions import load_dataset
    from rsitr.data.synth import write_synth
    from rsitr.eval.evaluate import evaluate
    from rsitr.methods.factory import load_model
    from rsitr.retrieval.metrics import format_table
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    t0 = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    ann = data_dir / "dataset_synth.json"
    if not ann.is_file():
        write_synth(data_dir, n_images=images, seed=seed)
    data = load_dataset(ann)
    test = data.split("test")
    import torch

    torch.manual_seed(seed)  # the fresh heads of the "before" model: the same row on every run
    before_model = load_model(backbone)
    defaults = dict(DEMO_DEFAULTS["split" if before_model.capabilities.trunk_cache else "whole"])
    if mode:
        defaults["mode"] = mode
    if epochs:
        defaults["epochs"] = epochs
    before = evaluate(before_model, test, progress=progress)
    del before_model
    run_dir = out / f"run-{backbone.replace(':', '_').replace('/', '_')}"
    cfg = TrainConfig().override({
        "data.path": str(ann), "out_dir": str(run_dir), "model.backbone": backbone, "model.mode": defaults["mode"],
        "epochs": defaults["epochs"], "lr": defaults["lr"], "batch_size": defaults["batch_size"],
        "warmup_steps": defaults["warmup_steps"], "weight_decay": defaults["weight_decay"], "seed": seed, "time_budget": time_budget,
    })
    result = train(cfg, resume=True, progress=progress)
    after = result.test
    seconds = time.perf_counter() - t0
    summary = {"backbone": backbone, "mode": defaults["mode"], "epochs": defaults["epochs"], "images": len(data), "test_images": len(test),
               "test_captions": test.n_captions, "before": before, "after": after, "trainable_params": result.trainable_params,
               "total_params": result.total_params, "train_seconds": round(result.seconds, 1), "total_seconds": round(seconds, 1),
               "time_budget": time_budget, "steps": result.history[-1]["global_step"] if result.history else 0}
    atomic_write_json(out / "demo.json", summary)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        print(f"synthetic benchmark: {len(data)} images ({data.splits}); test split {len(test)} images / {test.n_captions} captions")
        print(f"backbone {backbone}, mode {defaults['mode']}: {result.trainable_params:,} trainable of {result.total_params:,} parameters")
        name = backbone.split(":", 1)[-1]
        print(format_table({f"{name} before training": before, f"{name} trained (best-val checkpoint)": after},
                           title=f"synthetic test split, {summary['steps']} steps" + (f" (time budget {time_budget:.0f}s)" if time_budget else "")))
        print(f"\ntrain {result.seconds:.1f}s, total {seconds:.1f}s; run folder {run_dir}")
    from rsitr.cli.common import undertrained

    return 3 if undertrained(result, time_budget) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(out=Path(args.out), images=args.images, seed=args.seed, backbone=args.backbone, epochs=args.epochs,
                    mode=args.mode, json_out=args.json, progress=not args.quiet, time_budget=args.time_budget)


def add_demo_cli(sub) -> None:
    """``rsitr demo`` on ``rsitr``'s subparsers."""
    d = sub.add_parser("demo", help="the main job on the embedded default: synthetic data, small pretrained model, before/after table")
    d.add_argument("--out", default="runs/demo", help="folder for the benchmark, the trunk cache and the run (default runs/demo)")
    d.add_argument("--images", type=int, default=1000, help="synthetic images to write (default 1000)")
    d.add_argument("--seed", type=int, default=0, help="seed of the benchmark, the heads and training (default 0)")
    d.add_argument("--backbone", default="towers:efficientnet-lite0+minilm-l6", help="towers:NAME, clip:tiny, or a CLIP checkpoint path (default: the two-tower model)")
    d.add_argument("--mode", default=None, help="what trains (default: the backbone's demo choice)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: the backbone's demo choice, 30 for the towers)")
    d.add_argument("--time-budget", type=float, default=None, help="seconds for the run, trunk caching included; refused up front if caching alone would exceed it")
    d.add_argument("--json", action="store_true", help="print the before/after metrics as JSON")
    d.set_defaults(func=cmd_demo)
