"""FTF's intra-modal terms (pooled embedding vs the token set of the same item), as pure functions of
tensors. The inter-modal fine term is built on the interaction of :mod:`rsitr.retrieval.interaction`
and lives with the method (:mod:`rsitr.methods.ftf`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.data.types import Features
from rsitr.losses.contrastive import info_nce, logit_scale_exp


def token_mean(f: Features) -> torch.Tensor:
    """Masked mean of the L2-normalised tokens ``[B, D]`` (the token-set granularity)."""
    t = F.normalize(f.tokens.float(), dim=-1)
    m = f.mask.to(t.dtype)[..., None]
    return (t * m).sum(1) / m.sum(1).clamp_min(1.0)


def intra_granularity(pooled: torch.Tensor, tokens_mean: torch.Tensor, logit_scale) -> torch.Tensor:
    """Intra-modal InfoNCE between each item's pooled embedding and its own token mean."""
    return info_nce(pooled, tokens_mean, logit_scale)


def intra_structure(pooled: torch.Tensor, tokens_mean: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric KL between the in-batch (self excluded) similarity distributions of two
    granularities of one modality."""
    a = F.normalize(pooled.float(), dim=-1)
    b = F.normalize(tokens_mean.float(), dim=-1)
    s = logit_scale_exp(logit_scale).to(a.device)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    la = F.log_softmax((s * a @ a.t()).masked_fill(eye, -1e4), dim=-1)
    lb = F.log_softmax((s * b @ b.t()).masked_fill(eye, -1e4), dim=-1)
    return 0.5 * (F.kl_div(la, lb, log_target=True, reduction="batchmean") + F.kl_div(lb, la, log_target=True, reduction="batchmean"))


__all__ = ["intra_granularity", "intra_structure", "token_mean"]
