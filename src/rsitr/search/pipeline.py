"""The index build's decode pipeline: keep the cores on the model.

Items are decoded, resized and normalised by a pool of ``workers`` threads (PIL's decode and
resize, rasterio's reads and numpy's arithmetic release the GIL, so threads run them in parallel
without the pickling and start-up cost of processes), each writing its tile straight into its row
of a preallocated ``float32`` batch ``[B, 3, S, S]`` (``/255``, ``-mean``, ``/std``: the same
correctly rounded float32 operations as :class:`rsitr.data.transforms.EvalTransform`, so the
pixels are bit-identical to the per-image path). Normalising in the workers rather than on the
encoder's thread leaves that thread nothing to do between two encodes but wait for a batch that is
already done. The build submits the next batches' items before it encodes the current one, so
decoding overlaps encoding.

:class:`StageTimes` records where a build's time goes: ``decode`` (reading and decoding, summed
over the workers), ``resize`` (resize, crop and the normalised copy into the batch, summed over the workers),
``wait`` (the encoder waiting for a batch that is not decoded yet), ``encode`` (the model, test-time
views included) and ``write`` (chunks and the final merge: item table, embeddings, vector index).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from rsitr.data.transforms import EvalTransform
from rsitr.search.sources import Item, read_item
from rsitr.utils.errors import DataError

log = logging.getLogger(__name__)

STAGES = ("decode", "resize", "wait", "encode", "write")


class StageTimes:
    """Seconds per stage of a build (thread-safe: the decode workers add to it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.seconds = {s: 0.0 for s in STAGES}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{stage: {"seconds", "share"}}``; shares are of the sum over the stages (decode and
        resize are summed over the workers, so they may overlap encode in wall time)."""
        total = sum(self.seconds.values()) or 1.0
        return {s: {"seconds": round(v, 3), "share": round(v / total, 3)} for s, v in self.seconds.items()}

    def summary(self) -> str:
        return format_profile(self.as_dict())


def format_profile(profile: dict[str, dict[str, float]]) -> str:
    """``decode 1.2s (10%), resize ...`` of a :meth:`StageTimes.as_dict` record."""
    return ", ".join(f"{s} {d['seconds']:.1f}s ({100 * d['share']:.0f}%)" for s, d in profile.items())


@dataclass
class PendingBatch:
    """A batch being decoded: its items, the float32 buffer their rows go into, one future per item."""

    items: list[Item]
    buffer: np.ndarray
    futures: list[Future]


class BatchDecoder:
    """Decodes items into preallocated uint8 batches on ``workers`` threads (module doc)."""

    def __init__(self, transform: EvalTransform, workers: int, times: StageTimes, *, skip_bad: bool = False,
                 read: Callable[[Item], object] = read_item):
        self.transform, self.times, self.skip_bad, self.read = transform, times, bool(skip_bad), read
        self.size = int(transform.size)
        self.mean = transform.mean.numpy().astype(np.float32).reshape(-1, 1, 1)
        self.std = transform.std.numpy().astype(np.float32).reshape(-1, 1, 1)
        self.pool = ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="rsitr-decode")

    def _one(self, item: Item, buffer: np.ndarray, row: int) -> None:
        t0 = time.perf_counter()
        img = self.read(item)
        t1 = time.perf_counter()
        img = self.transform.resize_crop(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        self.normalize_into(np.asarray(img, dtype=np.uint8), buffer[row])
        self.times.add("decode", t1 - t0)
        self.times.add("resize", time.perf_counter() - t1)

    def submit(self, items: Sequence[Item]) -> PendingBatch:
        """Start decoding ``items`` (returns at once)."""
        buf = np.empty((len(items), 3, self.size, self.size), np.float32)
        return PendingBatch(list(items), buf, [self.pool.submit(self._one, it, buf, j) for j, it in enumerate(items)])

    def result(self, pending: PendingBatch) -> tuple[list[Item], torch.Tensor | None]:
        """``(items decoded, normalised pixels [n, 3, S, S] float32 | None)``; an unreadable item
        raises its :class:`DataError`, or with ``skip_bad`` is logged and left out."""
        t0 = time.perf_counter()
        ok = []
        for j, fut in enumerate(pending.futures):
            try:
                fut.result()
                ok.append(j)
            except DataError as exc:
                if not self.skip_bad:
                    self.cancel(pending)
                    raise
                log.warning("skipped: %s", exc)
        self.times.add("wait", time.perf_counter() - t0)
        if not ok:
            return [], None
        buf = pending.buffer if len(ok) == len(pending.items) else pending.buffer[ok]
        return [pending.items[j] for j in ok], torch.from_numpy(buf)

    def normalize_into(self, rgb: np.ndarray, out: np.ndarray) -> None:
        """``uint8 [S, S, 3]`` -> ``out`` ``float32 [3, S, S]``: ``/255``, ``-mean``, ``/std``, in
        place (each step one correctly rounded float32 operation, as in ``to_tensor_normalized``)."""
        np.copyto(out, rgb.transpose(2, 0, 1), casting="unsafe")
        np.divide(out, np.float32(255), out=out)
        np.subtract(out, self.mean, out=out)
        np.divide(out, self.std, out=out)

    @staticmethod
    def cancel(pending: PendingBatch) -> None:
        for f in pending.futures:
            f.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["BatchDecoder", "PendingBatch", "STAGES", "StageTimes", "format_profile"]
