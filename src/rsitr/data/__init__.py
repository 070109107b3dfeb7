"""Caption datasets, image loading and transforms, the synthetic benchmark."""
from rsitr.data.types import KNOWN_SPLITS, CaptionDataset, ImageEntry

__all__ = ["KNOWN_SPLITS", "CaptionDataset", "ImageEntry"]
