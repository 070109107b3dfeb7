"""What every subcommand module of the CLI shares."""
from __future__ import annotations

import argparse
from typing import Callable


def add_command(sub, name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None],
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """``name`` on the subparsers ``sub``: its arguments from ``add_args``, run by ``func``."""
    p = sub.add_parser(name, help=help)
    add_args(p)
    p.set_defaults(func=func)
    return p


def undertrained(result, time_budget) -> bool:
    """Print why and return True when ``time_budget`` stopped a training run before one epoch
    (:attr:`rsitr.train.loop.TrainResult.undertrained`): the caller then exits 3, not 0."""
    import sys

    if not result.undertrained:
        return False
    print(f"rsitr: error: time_budget={time_budget:g} s left time for {result.steps} training step{'s' if result.steps != 1 else ''}, less than one epoch "
          f"({result.steps_per_epoch}): this model is not trained. Raise the budget (the trunk cache in the run folder is reused), "
          f"or continue with --resume and a larger one", file=sys.stderr)
    return True


def add_engine_arg(p: argparse.ArgumentParser) -> None:
    """``--engine``: how no-grad encodes run (:mod:`rsitr.models.engine`)."""
    p.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto",
                   help="no-grad encoder: ONNX Runtime (auto: where installed) or eager torch; same results within 1e-4")
