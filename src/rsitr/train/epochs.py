"""The epoch's training pairs and the number of optimizer steps they make."""
from __future__ import annotations

import numpy as np

from rsitr.data.types import CaptionDataset


def epoch_order(dataset: CaptionDataset, epoch: int, seed: int, unit: str = "pairs") -> np.ndarray:
    """Deterministic list of (image index, caption index within the image) for one epoch.

    Depends only on (seed, epoch), so a resumed run sees exactly the order it would have seen.
    ``unit="pairs"``: every caption once (the field's usual epoch); ``"images"``: one random
    caption per image. A mix of datasets with sampling weights (:mod:`rsitr.data.mixed`) gives
    each part its weight's share of the epoch (:func:`_weighted_order`).
    """
    if any(w is not None for w in dataset.part_weights.values()):
        return _weighted_order(dataset, epoch, seed, unit)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if unit == "pairs":
        pairs = np.array([(i, c) for i, e in enumerate(dataset.entries) for c in range(len(e.captions))], dtype=np.int64)
    elif unit == "images":
        pairs = np.array([(i, int(rng.integers(len(e.captions)))) for i, e in enumerate(dataset.entries)], dtype=np.int64)
    else:
        raise ValueError(f"epoch_unit must be 'pairs' or 'images', got {unit!r}")
    return pairs[rng.permutation(len(pairs))]


def _weighted_order(dataset: CaptionDataset, epoch: int, seed: int, unit: str) -> np.ndarray:
    """An epoch of a weighted mix: as many pairs as the plain order (so an epoch is the same number
    of steps), part ``p`` contributing ``round(n * w_p / sum(w))`` of them -- its own pairs in a
    fresh random order, repeated when it is asked for more than it has and cut when for fewer."""
    parts = [(name, a, b) for name, a, b in dataset.parts() if b > a]
    weights = np.array([dataset.part_weights[name] for name, _, _ in parts], dtype=np.float64)
    chunks = []
    for k, (name, a, b) in enumerate(parts):
        own = epoch_order(dataset.subset(a, b), epoch, seed + 7919 * (k + 1), unit)
        own[:, 0] += a
        chunks.append(own)
    n = sum(len(c) for c in chunks)
    counts = np.floor(n * weights / weights.sum()).astype(np.int64)
    counts[np.argmax(weights)] += n - counts.sum()  # rounding remainder to the heaviest part
    rng = np.random.default_rng([seed, epoch, 0x313])
    pairs = np.concatenate([np.resize(c, (int(m), 2)) for c, m in zip(chunks, counts) if m > 0])
    return pairs[rng.permutation(len(pairs))]


def steps_per_epoch(n_pairs: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; the last incomplete global batch is dropped (InfoNCE wants
    full batches), so every step sees ``batch_size * grad_accum`` pairs."""
    return n_pairs // (batch_size * grad_accum)
