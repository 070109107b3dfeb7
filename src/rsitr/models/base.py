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

What a backbone can do beyond that is *declared*, never probed: :attr:`Backbone.capabilities`
(a :class:`BackboneCapabilities`) says whether it has a cacheable trunk/head split, which
fine-tuning modes it knows, where adapters go and whether it gives token features; the methods
behind those declarations are :meth:`Backbone.adapter_slots`, :meth:`Backbone.attention_projections`
and the trunk/head calls of :class:`SplitBackbone`. A new backbone family is one package that
subclasses :class:`Backbone` (or :class:`SplitBackbone`), fills these in and registers its builder
with :func:`rsitr.models.registry.register_backbone`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import nn

# data types the backbone interface speaks in (they live in the data layer, below the models)
from rsitr.data.transforms import PreprocessConfig
from rsitr.data.types import Features
from rsitr.utils.errors import RsitrError

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class BackboneCapabilities:
    """What a backbone class declares it can do (callers ask this instead of probing attributes).

    * ``trunk_cache``: the backbone is a :class:`SplitBackbone`: a trunk (frozen, cacheable, what
      the inference engine exports) and a small head per modality, ``x_head(x_trunk(.)) ==
      x_features(.)``;
    * ``modes``: the fine-tuning modes :meth:`Backbone.trainable_groups` knows;
    * ``adapter_slots``: per modality, where :meth:`Backbone.adapter_slots` puts adapters:
      ``"blocks"`` (transformer blocks, one adapter slot each, with attention projections for
      LoRA) or ``"token"`` (one slot over the trunk's output tokens, before pooling); a modality
      that is not listed has no slots;
    * ``token_outputs``: ``image_features`` / ``text_features`` return token-level features.
    """

    trunk_cache: bool = False
    modes: tuple[str, ...] = ("full", "locked-image", "heads", "frozen")
    adapter_slots: Mapping[str, str] = field(default_factory=dict)
    token_outputs: bool = True


@dataclass(frozen=True)
class AdapterSlots:
    """Where a parameter-efficient method puts its modules in one modality of a backbone.

    ``owners`` are modules with an ``adapter`` attribute (None, or a module ``adapter(x, valid) ->
    x`` over ``[B, N, W]`` hidden states, its residual included), one per transformer block
    (``kind == "blocks"``) or the one token slot (``kind == "token"``); ``widths`` are their
    hidden widths ``W``."""

    kind: str  # "blocks" | "token"
    owners: tuple[nn.Module, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("blocks", "token"):
            raise ValueError(f"adapter slot kind must be 'blocks' or 'token', got {self.kind!r}")
        if len(self.owners) != len(self.widths) or (self.kind == "token" and len(self.owners) != 1):
            raise ValueError("adapter slots: one width per owner, and exactly one owner for a token slot")

    def __len__(self) -> int:
        return len(self.owners)


def check_modality(modality: str) -> str:
    """``modality`` if it is ``"image"`` or ``"text"``, else a clear error."""
    if modality not in MODALITIES:
        raise RsitrError(f"modality must be 'image' or 'text', got {modality!r}")
    return modality


@dataclass
class BackboneInfo:
    """Identity of a backbone, stored in checkpoints and index manifests."""

    kind: str  # the family that built it ("clip", "towers", ...)
    name: str  # e.g. "ViT-B-32", "efficientnet-lite0+minilm-l6"
    config: dict = field(default_factory=dict)  # everything needed to rebuild the architecture
    weights: dict = field(default_factory=dict)  # source path(s) and sha256 of pretrained weights


class Backbone(nn.Module):
    """Abstract dual encoder. Subclasses implement the encode/feature methods and declare their
    :class:`BackboneCapabilities` (``capabilities``) with the methods behind them."""

    capabilities: ClassVar[BackboneCapabilities] = BackboneCapabilities()
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

    # -- adapter slots (parameter-efficient methods) ---------------------------------------------
    def adapter_slots(self, modality: str) -> AdapterSlots | None:
        """The adapter slots of ``modality``'s tower (kind as declared in
        ``capabilities.adapter_slots``), None when it has none (the default)."""
        check_modality(modality)
        return None

    def attention_projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """The attention projections of one of this backbone's ``"blocks"`` adapter owners, for
        LoRA: ``{"q", "k", "v": nn.Linear}`` or ``{"qkv": fused}``, plus ``{"o": nn.Linear}``.
        A ``fused`` module has ``in_proj_weight [3W, W]`` and a ``lora`` slot (None, or a module
        ``delta(x) -> [B, N, 3W]`` added to its q/k/v projection). Default: no attention."""
        raise RsitrError(f"backbone {self.info.name} declares no attention projections for block {type(block).__name__}")

    def trunk_cut(self, modality: str) -> str | None:
        """Where the cacheable trunk of ``modality`` ends when that is not the whole tower (part of
        trunk-cache and engine keys), else None (the default; always None without a split)."""
        check_modality(modality)
        return None

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


class SplitBackbone(Backbone):
    """A backbone whose towers are a *trunk* and a *head* each (``capabilities.trunk_cache``): the
    trunk's outputs of a frozen trunk are cached (:mod:`rsitr.models.trunk_cache`) and exported by
    the inference engine; the head (and anything trained, e.g. a token adapter slot) runs on them.

    Subclasses implement :meth:`image_trunk`, :meth:`image_head`, :meth:`text_trunk_core`,
    :meth:`text_head`, :meth:`trunk_modules` and :meth:`trunk_trainable`; the features are the
    head of the trunk."""

    capabilities: ClassVar[BackboneCapabilities] = BackboneCapabilities(trunk_cache=True)

    def image_trunk(self, pixels: torch.Tensor) -> Features:
        raise NotImplementedError

    def image_head(self, f: Features) -> Features:
        raise NotImplementedError

    def text_trunk_core(self, ids: torch.Tensor) -> Features:
        """The text trunk without data-dependent shapes (what the inference engine exports)."""
        raise NotImplementedError

    def text_trunk(self, ids: torch.Tensor, core=None) -> Features:
        """The text trunk; ``core`` (the engine's exported graph) replaces :meth:`text_trunk_core`."""
        return (core or self.text_trunk_core)(ids)

    def text_head(self, f: Features) -> Features:
        raise NotImplementedError

    def trunk_modules(self, modality: str) -> list[nn.Module]:
        """The modules whose tensors decide ``modality``'s trunk outputs (the engine keys its
        exported graphs by their state)."""
        raise NotImplementedError

    def trunk_trainable(self, modality: str) -> bool:
        """True iff any parameter of that trunk (below its cut) requires grad: then it is not cached."""
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> Features:
        return self.image_head(self.image_trunk(pixels))

    def text_features(self, ids: torch.Tensor) -> Features:
        return self.text_head(self.text_trunk(ids))


__all__ = ["AdapterSlots", "Backbone", "BackboneCapabilities", "BackboneInfo", "Features", "MODALITIES", "PreprocessConfig", "SplitBackbone",
           "check_modality"]
