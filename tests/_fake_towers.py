"""A two-tower-like backbone for adapter tests: the slot protocol without the towers' weights.

The text tower is 3 transformer-like blocks of width 10 (``adapter_blocks("text")``), the image
tower a CNN with one token-adapter slot of width 12 (``token_adapter_slot("image")``)."""
from __future__ import annotations

from torch import nn

from rsitr.models.base import Backbone, BackboneInfo


class FakeBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.ln = nn.LayerNorm(w)
        self.lin = nn.Linear(w, w)
        self.adapter = None


class FakeSlot(nn.Module):
    def __init__(self):
        super().__init__()
        self.adapter = None


class FakeTowers(Backbone):
    def __init__(self):
        super().__init__()
        self.embed_dim = 8
        self.info = BackboneInfo(kind="towers", name="fake", config={"image_width": 12})
        self.text_blocks = nn.ModuleList(FakeBlock(10) for _ in range(3))
        self.slot = FakeSlot()

    def adapter_blocks(self, modality):
        return self.text_blocks if modality == "text" else None

    def token_adapter_slot(self, modality):
        return self.slot if modality == "image" else None
