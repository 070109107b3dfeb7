"""iEBAKER's EBA-masked contrastive loss, as a pure function of tensors (see :mod:`rsitr.methods.iebaker`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.losses.contrastive import check_positives, drop_false_negatives, logit_scale_exp, multi_positive_ce, symmetric_ce


def masked_info_nce(img: torch.Tensor, txt: torch.Tensor, logit_scale, keep: torch.Tensor | None = None,
                    same: torch.Tensor | None = None, positives: str = "single") -> torch.Tensor:
    """Symmetric InfoNCE where only the ``keep`` pairs act as positives (query rows); every pair
    stays a candidate (column) except the ``same`` ones (see :func:`drop_false_negatives`), which
    with ``positives="multi"`` are positives of the query instead (soft targets,
    :func:`~rsitr.losses.contrastive.multi_positive_ce`). ``keep=None``: all pairs (= :func:`info_nce`)."""
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    logits = logit_scale_exp(logit_scale, img.device) * img @ txt.t()
    if same is not None and check_positives(positives) == "multi":
        return multi_positive_ce(logits, same, keep)
    return symmetric_ce(drop_false_negatives(logits, same), keep)


__all__ = ["masked_info_nce"]
