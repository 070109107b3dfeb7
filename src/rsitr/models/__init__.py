"""Backbones (CLIP, two-tower) and method components."""
from rsitr.models.base import Backbone, BackboneInfo, Features, PreprocessConfig

# The packages of the backbone families rsitr ships, imported by name on first use of
# rsitr.models.registry: each registers itself there (@register_backbone), so the registry
# imports no family. A new family adds its package here.
BACKBONE_FAMILIES = ("rsitr.models.clip", "rsitr.models.towers")

__all__ = ["BACKBONE_FAMILIES", "Backbone", "BackboneInfo", "Features", "PreprocessConfig"]
