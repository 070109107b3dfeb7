"""Losses as pure functions of tensors: the contrastive core (:mod:`.contrastive`: InfoNCE, the one
symmetric cross-entropy, the one temperature helper) and each method's terms (:mod:`.dtcl` RDB,
:mod:`.ftf`, :mod:`.iebaker`)."""
from rsitr.losses.contrastive import info_nce, logit_scale_exp, symmetric_ce

__all__ = ["info_nce", "logit_scale_exp", "symmetric_ce"]
