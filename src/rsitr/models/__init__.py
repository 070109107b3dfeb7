"""Backbones (CLIP, two-tower) and method components."""
from rsitr.models.base import Backbone, BackboneInfo, Features, PreprocessConfig

__all__ = ["Backbone", "BackboneInfo", "Features", "PreprocessConfig"]
