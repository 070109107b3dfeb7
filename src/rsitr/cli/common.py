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


# -- numeric options: every one checked at parse time, its allowed range in the message ----------
INT_MAX = 2**31 - 1  # larger counts overflow the C libraries underneath (FAISS, torch, sockets)


class in_range:
    """An argparse ``type``: a number of ``kind`` (int or float) in ``[lo, hi]`` (``lo_open``:
    ``lo`` itself excluded), finite; anything else is an argparse error that states the range."""

    def __init__(self, lo: float | None, hi: float | None, kind: type = int, *, lo_open: bool = False) -> None:
        self.lo, self.hi, self.kind, self.lo_open = lo, hi, kind, lo_open
        self.__name__ = kind.__name__  # argparse names the type in some of its messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo, hi = (None if v is None else f"{v:g}" for v in (self.lo, self.hi))
        if self.hi == INT_MAX:  # the technical cap is not worth stating
            return f"{what} >= {lo}" if lo is not None else what
        if lo is not None and hi is not None and not self.lo_open:
            return f"{what} in {lo}..{hi}"
        if lo is not None and hi is not None:
            return f"{what} > {lo} and <= {hi}"
        if lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo}"
        return what

    def __call__(self, text: str):
        import math

        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        if self.hi is not None and value > self.hi:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"in_range({self.describe()})"


positive_int = in_range(1, INT_MAX)
nonneg_int = in_range(0, INT_MAX)
port = in_range(1, 65535)
positive_float = in_range(0.0, None, float, lo_open=True)
nonneg_float = in_range(0.0, None, float)
fraction = in_range(0.0, 1.0, float)

# options whose range is not the default one (ints >= 1, floats > 0); keyed by argparse dest, or by
# "<subcommand path> <dest>" where one name means different things in different subcommands
NUMERIC_RANGES: dict[str, in_range] = {
    "seed": nonneg_int, "seeds": nonneg_int, "overlap": nonneg_int, "queries": nonneg_int,
    "exhaustive_queries": nonneg_int, "flat_only_above": nonneg_int, "eval workers": nonneg_int,
    "port": port, "warmup": nonneg_float, "idle": nonneg_float, "unused_days": nonneg_float,
    "noise_frac": fraction, "alpha": fraction, "balance": fraction, "max_nodata": fraction,
}


def check_numeric_options(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every ``type=int`` / ``type=float`` option of ``parser`` and its subcommands a checked
    type (:class:`in_range`): its entry in :data:`NUMERIC_RANGES`, else ints >= 1 and floats > 0.
    Run once on the finished parser, so that an option added anywhere is checked the same way."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                check_numeric_options(sub, f"{path} {name}".strip())
            continue
        if action.type not in (int, float):
            continue
        rng = NUMERIC_RANGES.get(f"{path} {action.dest}") or NUMERIC_RANGES.get(action.dest)
        if rng is None:
            rng = positive_int if action.type is int else positive_float
        if rng.kind is not action.type:
            rng = in_range(rng.lo, rng.hi if action.type is float or rng.hi is None else int(rng.hi), action.type, lo_open=rng.lo_open)
        action.type = rng
