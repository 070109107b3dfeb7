"""The epoch's training pairs and the number of optimizer steps they make."""
from __future__ import annotations

import numpy as np

from rsitr.data.types import CaptionDataset


def epoch_order(dataset: CaptionDataset, epoch: int, seed: int, unit: str = "pairs") -> np.ndarray:
    """Deterministic list of (image index, caption index within the image) for one epoch.

    Depends only on (seed, epoch), so a resumed run sees exactly the order it would have seen.
    ``unit="pairs"``: every caption once (the field's usual epoch); ``"images"``: one random
    caption per image.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if unit == "pairs":
        pairs = np.array([(i, c) for i, e in enumerate(dataset.entries) for c in range(len(e.captions))], dtype=np.int64)
    elif unit == "images":
        pairs = np.array([(i, int(rng.integers(len(e.captions)))) for i, e in enumerate(dataset.entries)], dtype=np.int64)
    else:
        raise ValueError(f"epoch_unit must be 'pairs' or 'images', got {unit!r}")
    return pairs[rng.permutation(len(pairs))]


def steps_per_epoch(n_pairs: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; the last incomplete global batch is dropped (InfoNCE wants
    full batches), so every step sees ``batch_size * grad_accum`` pairs."""
    return n_pairs // (batch_size * grad_accum)
