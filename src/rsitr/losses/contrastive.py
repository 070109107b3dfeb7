"""Contrastive losses: pure functions of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float, same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3 pseudo-code).

    ``image_emb[i]`` and ``text_emb[i]`` form the positive pair; every other row in the batch
    is a negative. Embeddings are L2-normalised here; ``logit_scale`` is the *log* inverse
    temperature (clamped to ln 100 as in CLIP). Returns the mean of the i2t and t2i
    cross-entropies.

    ``same`` (optional, bool ``[n_images, n_texts]``): off-diagonal pairs that are not negatives
    (text j also describes image i); they leave both softmax denominators, see
    :func:`drop_false_negatives`.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image/text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=img.device).clamp(max=MAX_LOGIT_SCALE).exp()
    logits = drop_false_negatives(scale * img @ txt.t(), same)
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


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
