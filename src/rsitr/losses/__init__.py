"""Losses as pure functions of tensors."""
from rsitr.losses.contrastive import info_nce

__all__ = ["info_nce"]
