"""The one backbone interface every method is written against.

A backbone is a dual encoder: an image tower and a text tower projected into a shared
embedding space. Methods (RDB adapters, KER, FTF interaction) only use what is declared here,
so they run on the CLIP backbone and on the two-tower (EfficientNet-Lite + MiniLM) backbone.

Conventions
-----------
* ``tokenize(texts)`` returns a ``LongTensor [B, L]``; padding id is ``pad_id`` (0 for both
  CLIP's BPE and BERT's WordPiece), so the attention mask is ``ids != pad_id``.
* ``encode_image(pixels)`` / ``encode_text(ids)`` return *projected, not normalised* pooled
  embeddings ``[B, D]`` (for CLIP: the same values open_clip returns).
* ``image_features(pixels)`` / ``text_features(ids)`` return :class:`Features`: the pooled
  embedding plus token-level features projected to the same space (ViT patch tokens / CNN
  spatial positions; word tokens), with a validity mask.
* ``preprocess`` describes the eval image transform (size, mean, std, interpolation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# data types the backbone interface speaks in (they live in the data layer, below the models)
from rsitr.data.transforms import PreprocessConfig
from rsitr.data.types import Features


@dataclass
class BackboneInfo:
    """Identity of a backbone, stored in checkpoints and index manifests."""

    kind: str  # "clip" | "towers"
    name: str  # e.g. "ViT-B-32", "efficientnet-lite0+minilm-l6"
    config: dict = field(default_factory=dict)  # everything needed to rebuild the architecture
    weights: dict = field(default_factory=dict)  # source path(s) and sha256 of pretrained weights


class Backbone(nn.Module):
    """Abstract dual encoder. Subclasses implement the encode/feature methods."""

    info: BackboneInfo
    embed_dim: int
    context_length: int
    pad_id: int = 0
    preprocess: PreprocessConfig

    # -- text ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:  # [B, L] long
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:  # [B, D]
        return self.text_features(ids).pooled

    def text_features(self, ids: torch.Tensor) -> Features:
        raise NotImplementedError

    # -- image --------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, D]
        return self.image_features(pixels).pooled

    def image_features(self, pixels: torch.Tensor) -> Features:
        raise NotImplementedError

    # -- training helpers -----------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter | None:
        """Learnable log inverse temperature if the model has one (CLIP's ``logit_scale``
        parameter, registered under that name so state dicts keep the OpenAI key), else None."""
        return self._parameters.get("logit_scale")

    def set_mode(self, mode: str) -> None:
        """Prepare the backbone for fine-tuning ``mode`` before training or loading a checkpoint
        trained in it (the two-tower moves its trunk/head cut points for ``top:I,T``). Default:
        nothing to do."""

    def trainable_groups(self, mode: str) -> dict[str, list[nn.Parameter]]:
        """Parameter groups for a fine-tuning ``mode`` ("full", "locked-image", "heads", "frozen").

        Subclasses decide what each mode means for their towers; the default is full
        fine-tuning of every parameter.
        """
        return {"all": [p for p in self.parameters()]}

    def apply_mode(self, mode: str) -> dict[str, list[nn.Parameter]]:
        """:meth:`set_mode`, then only the parameters of ``mode``'s groups require gradients;
        returns the groups."""
        self.set_mode(mode)
        for p in self.parameters():
            p.requires_grad_(False)
        groups = self.trainable_groups(mode)
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return groups


__all__ = ["Backbone", "BackboneInfo", "Features", "PreprocessConfig"]
