"""Contrastive losses: pure functions of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float, same: torch.Tensor | None = None,
             positives: str = "single") -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3 pseudo-code).

    ``image_emb[i]`` and ``text_emb[i]`` form the positive pair; every other row in the batch
    is a negative. Embeddings are L2-normalised here; ``logit_scale`` is the *log* inverse
    temperature (clamped to ln 100 as in CLIP). Returns the mean of the i2t and t2i
    cross-entropies.

    ``same`` (optional, bool ``[n_images, n_texts]``): off-diagonal pairs that are not negatives
    (text j also describes image i); they leave both softmax denominators, see
    :func:`drop_false_negatives`. With ``positives="multi"`` they are positives instead: soft
    targets spread over them (:func:`multi_positive_ce`).
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image/text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale_exp(logit_scale, img.device) * img @ txt.t()
    if same is not None and check_positives(positives) == "multi":
        return multi_positive_ce(logits, same)
    return symmetric_ce(drop_false_negatives(logits, same))


def logit_scale_exp(logit_scale: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
    """The logit multiplier ``exp(logit_scale)`` of a *log* inverse temperature, in float32, with
    the log clamped at ln 100 as in CLIP (the one temperature helper of every loss)."""
    return torch.as_tensor(logit_scale, dtype=torch.float32, device=device).clamp(max=MAX_LOGIT_SCALE).exp()


def symmetric_ce(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the row and column cross-entropies of a square logit matrix (rows: images, columns:
    texts) with the diagonal as target. ``keep`` (bool per pair): only those rows act as queries
    (and those columns, in the other direction); every pair stays a candidate. No pair kept: 0."""
    target = torch.arange(logits.shape[0], device=logits.device)
    if keep is None:
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return 0.5 * (F.cross_entropy(logits[keep], target[keep]) + F.cross_entropy(logits.t()[keep], target[keep]))


def drop_false_negatives(logits: torch.Tensor, same: torch.Tensor | None) -> torch.Tensor:
    """``logits`` (rows: images, columns: texts, the diagonal the matched pairs) with the
    off-diagonal entries where ``same`` is true set to -inf: in both directions such a pair is
    neither the target nor a negative (false-negative elimination; used when the same sentence
    describes several images of the batch). ``same=None``: unchanged."""
    if same is None:
        return logits
    if same.shape != logits.shape:
        raise ValueError(f"same-text mask {tuple(same.shape)} does not match the logits {tuple(logits.shape)}")
    off = same.to(device=logits.device, dtype=torch.bool) & ~torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(off, float("-inf")) if bool(off.any()) else logits


POSITIVES = ("single", "multi")


def check_positives(positives: str) -> str:
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    return positives


def multi_positive_ce(logits: torch.Tensor, same: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy with several positives per query (``method.positives: multi``):
    the target of image row i is uniform over the texts j with ``same[i, j]`` (its own caption, on
    the diagonal, and every batch caption with the same sentence as one of its captions), the
    target of text column j uniform over the images i with ``same[i, j]`` -- the soft-target
    multi-positive contrastive loss (as in UniCL, Yang et al. 2022, and StableRep, Tian et al.
    2023). Without off-diagonal positives it is the plain symmetric InfoNCE. ``keep`` (bool
    ``[n]``): only those rows / columns act as queries (iEBAKER's EBA); the others stay candidates."""
    if same.shape != logits.shape:
        raise ValueError(f"positive mask {tuple(same.shape)} does not match the logits {tuple(logits.shape)}")
    pos = same.to(device=logits.device, dtype=torch.bool) | torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    q = pos.to(logits.dtype)
    i2t = -((q / q.sum(1, keepdim=True)) * F.log_softmax(logits, dim=1)).sum(1)
    t2i = -((q.t() / q.t().sum(1, keepdim=True)) * F.log_softmax(logits.t(), dim=1)).sum(1)
    if keep is not None:
        if not bool(keep.any()):
            return logits.sum() * 0.0
        i2t, t2i = i2t[keep], t2i[keep]
    return 0.5 * (i2t.mean() + t2i.mean())
