"""RDB's Dual-Task Consistency Loss (DTCL) terms and their weightings, as pure functions of tensors
(see :mod:`rsitr.methods.rdb` for how the method combines them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def similarity_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``scale * cos(image_i, text_j)`` -> ``[B_img, B_txt]``."""
    return scale * F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()


def consistency_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean of ``KL(softmax(T) || softmax(S))`` over the rows (image->text) and over the columns
    (text->image); the teacher is a constant target."""
    t = teacher_logits.detach().float()
    s = student_logits.float()

    def kl(sl: torch.Tensor, tl: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(sl, dim=1), F.log_softmax(tl, dim=1), log_target=True, reduction="batchmean")

    return 0.5 * (kl(s, t) + kl(s.t(), t.t()))


def classification_loss(head: nn.Module, pooled: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean over ``pooled`` (image and/or text embeddings) of the cross-entropy of ``head`` on the
    L2-normalised embeddings; label -1 = unknown (ignored). 0 when no label is known."""
    if not bool((labels >= 0).any()):
        return pooled[0].new_zeros(()).float()
    losses = [F.cross_entropy(head(F.normalize(p.float(), dim=-1)), labels, ignore_index=-1) for p in pooled]
    return torch.stack(losses).mean()


def uncertainty_weighting(losses: dict[str, torch.Tensor], log_vars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Kendall et al. (2018): ``sum_i exp(-s_i) L_i + s_i``; returns the total and the weights."""
    total = 0.0
    weights = {}
    for k, v in losses.items():
        s = log_vars[k]
        total = total + torch.exp(-s) * v + s
        weights[k] = float(torch.exp(-s).detach())
    return total, weights


def fixed_weighting(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    total = 0.0
    for k, v in losses.items():
        total = total + weights[k] * v
    return total, {k: float(weights[k]) for k in losses}


__all__ = ["classification_loss", "consistency_kl", "fixed_weighting", "similarity_logits", "uncertainty_weighting"]
