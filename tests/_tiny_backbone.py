"""A third backbone family in one file: the proof that a backbone is what
:mod:`rsitr.models.base` declares, nothing more (tests register it with
:func:`rsitr.models.registry.register_backbone` as ``tinytest:mini``).

It is a :class:`~rsitr.models.base.SplitBackbone` of its own design (neither CLIP's nor the
two-tower's modules): each trunk is one embedding (a 4x4 patch convolution for 16-pixel images, a
word embedding for captions), each head two small pre-norm attention blocks of width 12 with
separate q/k/v/o projections and an ``adapter`` slot, mean pooling and a linear projection to 8
dimensions. It declares adapter slots of kind ``"blocks"`` in both modalities (in the heads, so a
frozen trunk stays cacheable) and the attention projections of its blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from rsitr.data.transforms import PreprocessConfig
from rsitr.models.base import AdapterSlots, BackboneCapabilities, BackboneInfo, Features, SplitBackbone, check_modality

FAMILY, NAME = "tinytest", "mini"
WIDTH, DIM, CONTEXT, VOCAB, BLOCKS = 12, 8, 12, 97, 2


class TinyBlock(nn.Module):
    """Pre-norm self-attention + MLP; ``adapter(x, valid)`` (None by default) on its output."""

    def __init__(self, width: int = WIDTH, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, n, self.heads, w // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        x = x + self.o(att.transpose(1, 2).reshape(b, n, w))
        x = x + self.mlp(self.norm2(x))
        return x if self.adapter is None else self.adapter(x, valid)


class TinyBackbone(SplitBackbone):
    capabilities = BackboneCapabilities(trunk_cache=True, adapter_slots={"image": "blocks", "text": "blocks"})

    def __init__(self):
        super().__init__()
        self.embed_dim, self.context_length = DIM, CONTEXT
        self.preprocess = PreprocessConfig(image_size=16)
        self.info = BackboneInfo(kind=FAMILY, name=NAME, config={"width": WIDTH, "embed_dim": DIM})
        self.patches = nn.Conv2d(3, WIDTH, kernel_size=4, stride=4)
        self.words = nn.Embedding(VOCAB, WIDTH)
        self.image_blocks = nn.ModuleList(TinyBlock() for _ in range(BLOCKS))
        self.text_blocks = nn.ModuleList(TinyBlock() for _ in range(BLOCKS))
        self.image_proj, self.text_proj = nn.Linear(WIDTH, DIM), nn.Linear(WIDTH, DIM)

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [1 + sum(map(ord, w)) % (VOCAB - 1) for w in t.lower().split()][:CONTEXT] or [1]
            ids[i, : len(words)] = torch.tensor(words)
        return ids

    def text_trunk_core(self, ids: torch.Tensor) -> Features:
        valid = ids != self.pad_id
        tokens = self.words(ids)
        return Features(_mean(tokens, valid), tokens, valid)

    def text_head(self, f: Features) -> Features:
        return self._head(f, self.text_blocks, self.text_proj)

    # -- image -----------------------------------------------------------------------------------
    def image_trunk(self, pixels: torch.Tensor) -> Features:
        tokens = self.patches(pixels).flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Features(tokens.mean(1), tokens, mask)

    def image_head(self, f: Features) -> Features:
        return self._head(f, self.image_blocks, self.image_proj)

    def _head(self, f: Features, blocks: nn.ModuleList, proj: nn.Linear) -> Features:
        if f.tokens.shape[1] == 0:  # pooled-only cached trunk features
            return Features(proj(f.pooled), proj(f.tokens), f.mask)
        x = f.tokens.float()
        for block in blocks:
            x = block(x, f.mask)
        tokens = proj(x)
        return Features(_mean(tokens, f.mask), tokens, f.mask)

    # -- declared capabilities -----------------------------------------------------------------
    def trunk_modules(self, modality: str) -> list[nn.Module]:
        return [self.patches] if check_modality(modality) == "image" else [self.words]

    def trunk_trainable(self, modality: str) -> bool:
        return any(p.requires_grad for m in self.trunk_modules(modality) for p in m.parameters())

    def adapter_slots(self, modality: str) -> AdapterSlots:
        blocks = self.image_blocks if check_modality(modality) == "image" else self.text_blocks
        return AdapterSlots("blocks", tuple(blocks), (WIDTH,) * len(blocks))

    def attention_projections(self, block: nn.Module) -> dict[str, nn.Module]:
        return {"q": block.q, "k": block.k, "v": block.v, "o": block.o}

    def trainable_groups(self, mode: str) -> dict[str, list[nn.Parameter]]:
        heads = {"image_head": [*self.image_blocks.parameters(), *self.image_proj.parameters()],
                 "text_head": [*self.text_blocks.parameters(), *self.text_proj.parameters()]}
        if mode == "heads":
            return heads
        if mode == "full":
            return {"trunks": [*self.patches.parameters(), *self.words.parameters()], **heads}
        if mode == "locked-image":
            return {"text": list(self.words.parameters()), **heads}
        if mode == "frozen":
            return {}
        raise ValueError(f"unknown mode {mode!r}")


def _mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


def build_tiny(name: str, device: str, **_) -> TinyBackbone:
    """The registered builder of ``tinytest:mini``."""
    if name != NAME:
        raise ValueError(f"unknown tiny backbone {name!r}")
    return TinyBackbone().to(device)
