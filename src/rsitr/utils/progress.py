"""Progress of long work: a tqdm bar on a terminal, one log line per tenth of the work otherwise.

With stderr redirected to a file, tqdm's redraws (carriage returns, one per update) turn a log
into hundreds of kilobytes; :func:`progress_bar` then logs ``desc: 30/100 (30%), 12.1 s, ETA 28 s``
at 10%, 20%, ... and at the end instead. The object has the part of tqdm's interface rsitr uses
(iteration, ``update``, ``set_postfix``, ``close``, context manager).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable

log = logging.getLogger("rsitr.progress")

STEPS = 10  # log lines per bar when not on a terminal


def _is_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LogProgress:
    """tqdm's interface, logging one line per ``1/STEPS`` of ``total`` (or per ``every`` items
    when the total is unknown)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
                 unit: str = "it", disable: bool = False, steps: int = STEPS, every: int = 1000, **_: Any):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n = initial
        self.start_n = initial
        self.steps, self.every = max(1, steps), max(1, every)
        self.t0 = time.perf_counter()
        self.postfix = ""
        self._next = self._threshold(self.n)
        self._closed = False

    def _threshold(self, n: int) -> int:
        if self.total:
            k = n * self.steps // self.total + 1
            return -(-k * self.total // self.steps)  # ceil
        return (n // self.every + 1) * self.every

    def _emit(self) -> None:
        dt = time.perf_counter() - self.t0
        done = self.n - self.start_n
        if self.total:
            eta = (dt / done * (self.total - self.n)) if done > 0 else float("nan")
            msg = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%), {dt:.1f} s"
            if self.n < self.total and done > 0:
                msg += f", ETA {eta:.0f} s"
        else:
            msg = f"{self.desc}: {self.n} {self.unit}, {dt:.1f} s"
        if self.postfix:
            msg += f" [{self.postfix}]"
        log.info(msg)

    def update(self, n: int = 1) -> None:
        if self.disable:
            return
        self.n += n
        if self.n >= self._next:
            self._emit()
            self._next = self._threshold(self.n)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        self._closed = True

    def __iter__(self):
        for x in self.iterable:  # type: ignore[union-attr]
            yield x
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", disable: bool = False,
                 leave: bool = False, log_steps: int = STEPS, **kw: Any):
    """A tqdm bar when stderr is a terminal, else a :class:`LogProgress` (``log_steps`` lines)."""
    if not disable and _is_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=leave, **kw)
    return LogProgress(iterable, total=total, desc=desc, disable=disable, steps=log_steps, **kw)
