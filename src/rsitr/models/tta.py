"""Test-time views: a tile's embedding averaged over its dihedral views, in one encoder call.

Shared by evaluation (:func:`rsitr.eval.evaluate.encode_dataset`) and the index build
(:mod:`rsitr.search.build`), so both average the same way: the ``n`` views of a batch
(:func:`rsitr.data.transforms.dihedral_views`, made on the already-resized pixels) are stacked
into one ``[n * B, C, S, S]`` batch and encoded by one call of the encoder (a backbone or its
:class:`rsitr.models.engine.InferenceEngine`); the pooled embedding of each image is the mean of
its ``n`` L2-normalised view embeddings (not renormalised: callers normalise). Token features,
when asked for, are those of the unrotated view (token positions do not rotate with a mean).
With ``n == 1`` the encoder's output is returned as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.data.transforms import DIHEDRAL_VIEWS, dihedral_views
from rsitr.models.base import Features


def check_views(n: int) -> int:
    """``n`` as an int if it is a number of test-time views (1, 4 or 8), else ValueError."""
    if int(n) not in DIHEDRAL_VIEWS or int(n) != n:
        raise ValueError(f"test-time views must be one of {DIHEDRAL_VIEWS}, got {n}")
    return int(n)


@torch.no_grad()
def encode_views(encoder, pixels: torch.Tensor, n: int = 1, *, tokens: bool = False) -> Features:
    """``Features`` of ``pixels [B, C, S, S]`` averaged over ``n`` dihedral views (module doc);
    ``tokens=False`` returns empty token/mask tensors and calls ``encoder.encode_image`` only."""
    n = check_views(n)
    b = pixels.shape[0]
    batch = pixels if n == 1 else torch.cat(dihedral_views(pixels, n))
    if tokens:
        f = encoder.image_features(batch)
    else:
        f = Features(encoder.encode_image(batch), pixels.new_zeros(0), pixels.new_zeros(0, dtype=torch.bool))
    if n == 1:
        return f
    pooled = F.normalize(f.pooled.float(), dim=-1).view(n, b, -1).mean(dim=0)
    if tokens:
        return Features(pooled, f.tokens[:b], f.mask[:b])
    return Features(pooled, f.tokens, f.mask)


__all__ = ["check_views", "encode_views"]
