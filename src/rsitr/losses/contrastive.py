"""Contrastive losses: pure functions of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3 pseudo-code).

    ``image_emb[i]`` and ``text_emb[i]`` form the positive pair; every other row in the batch
    is a negative. Embeddings are L2-normalised here; ``logit_scale`` is the *log* inverse
    temperature (clamped to ln 100 as in CLIP). Returns the mean of the i2t and t2i
    cross-entropies.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image/text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=img.device).clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
