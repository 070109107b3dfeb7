"""rsitr's own CLIP (ViT image tower + causal text transformer), in plain torch.

Parameter names follow the OpenAI / open_clip layout exactly (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``,
``text_projection``, ``logit_scale`` ...), so OpenAI and open_clip state dicts load with
``strict=True`` and Hugging Face checkpoints load after a key mapping
(:mod:`rsitr.models.clip.loading`).

Forward pass (Radford et al. 2021, Sec. 2.4; the open_clip defaults):

* image: patchify conv (no bias) -> prepend class token -> + positional embedding -> ``ln_pre``
  -> residual attention blocks -> ``ln_post`` on every token -> class token ``@ proj`` is the
  pooled embedding; the patch tokens ``@ proj`` are the token features;
* text: token embedding + positional embedding -> blocks with a causal mask -> ``ln_final``
  -> the token at the end-of-text position (the largest id, OpenAI's "argmax" pooling)
  ``@ text_projection``; every position ``@ text_projection`` gives the word-token features.

Every residual block has an ``adapter`` slot (``None`` by default) that parameter-efficient
methods (RDB's VEA/TSA) fill; an adapter receives the block output and the token validity mask
and returns the new hidden states (its own residual included).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.models.base import AdapterSlots, Backbone, BackboneCapabilities, BackboneInfo, Features, PreprocessConfig, check_modality
from rsitr.utils.errors import RsitrError


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_ratio: float = 4.0
    quick_gelu: bool = False  # OpenAI's original weights were trained with QuickGELU

    def to_dict(self) -> dict:
        return asdict(self)


# Named configurations (the public architectures, plus small ones for CPU/tests).
CONFIGS: dict[str, CLIPConfig] = {
    "tiny": CLIPConfig(embed_dim=128, image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=2,
                       text_width=128, text_layers=4, text_heads=2),
    "small": CLIPConfig(embed_dim=256, image_size=128, patch_size=16, vision_width=256, vision_layers=6, vision_heads=4,
                        text_width=256, text_layers=6, text_heads=4),
    "ViT-B-32": CLIPConfig(),
    "ViT-B-16": CLIPConfig(patch_size=16),
    "ViT-L-14": CLIPConfig(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                           text_width=768, text_layers=12, text_heads=12),
    "ViT-L-14-336": CLIPConfig(embed_dim=768, image_size=336, patch_size=14, vision_width=1024, vision_layers=24,
                               vision_heads=16, text_width=768, text_layers=12, text_heads=12),
    "ViT-H-14": CLIPConfig(embed_dim=1024, patch_size=14, vision_width=1280, vision_layers=32, vision_heads=16,
                           text_width=1024, text_layers=24, text_heads=16),
}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as OpenAI/open_clip do for fp16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        return F.layer_norm(x.float() if dtype == torch.float16 else x, self.normalized_shape, self.weight, self.bias, self.eps).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), computed with SDPA.

    ``lora`` is a slot for a low-rank update of the fused q/k/v projection (None by default): a
    module ``delta(x) -> [B, N, 3W]`` added to ``x @ in_proj_weight.T + in_proj_bias``. LoRA
    methods fill it (its tensors are saved as ``...attn.lora.*``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise RsitrError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.lora: nn.Module | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.lora is not None:
            qkv = qkv + self.lora(x)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        if self.adapter is not None:
            x = self.adapter(x, valid)
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, valid, use_reentrant=False)
            else:
                x = block(x, attn_mask, valid)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.vision_width
        if cfg.image_size % cfg.patch_size:
            raise RsitrError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.grid = cfg.image_size // cfg.patch_size
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_ratio, cfg.quick_gelu)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled [B, D], patch tokens [B, N, D]), both projected."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, N, W]
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise RsitrError(f"image of {tuple(pixels.shape[-2:])} px gives {x.shape[1]} patches; the model expects {self.positional_embedding.shape[0] - 1}")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.ln_post(x) @ self.proj
        return x[:, 0], x[:, 1:]


def _init_transformer(t: Transformer) -> None:
    """OpenAI's initialisation (std scaled by width and depth)."""
    proj_std = (t.width ** -0.5) * ((2 * t.layers) ** -0.5)
    attn_std = t.width ** -0.5
    fc_std = (2 * t.width) ** -0.5
    for b in t.resblocks:
        nn.init.normal_(b.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(b.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(b.attn.out_proj.bias)
        nn.init.normal_(b.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(b.mlp.c_proj.weight, std=proj_std)


class CLIP(Backbone):
    """CLIP dual encoder implementing :class:`~rsitr.models.base.Backbone` (no trunk/head split:
    adapters sit inside the transformer blocks of both towers)."""

    capabilities = BackboneCapabilities(adapter_slots={"image": "blocks", "text": "blocks"})

    def __init__(self, cfg: CLIPConfig, *, name: str | None = None, weights: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.context_length = cfg.context_length
        self.pad_id = 0
        self.preprocess = PreprocessConfig(image_size=cfg.image_size)
        self.info = BackboneInfo(kind="clip", name=name or "custom", config=cfg.to_dict(), weights=dict(weights or {}))

        self.visual = VisionTransformer(cfg)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp_ratio, cfg.quick_gelu)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        # stored in _parameters directly: the Backbone.logit_scale property reads it from there
        self._parameters["logit_scale"] = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1), persistent=False)
        self._init()

    def _init(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.cfg.text_width ** -0.5)
        _init_transformer(self.transformer)
        _init_transformer(self.visual.transformer)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | dict | CLIPConfig, **overrides) -> "CLIP":
        """A randomly initialised CLIP of a named (``"tiny"``, ``"ViT-B-32"``...) or explicit config."""
        if isinstance(config, str):
            if config not in CONFIGS:
                raise RsitrError(f"unknown CLIP config {config!r}; available: {sorted(CONFIGS)}")
            cfg, name = CLIPConfig(**{**CONFIGS[config].to_dict(), **overrides}), config
        elif isinstance(config, CLIPConfig):
            cfg, name = CLIPConfig(**{**config.to_dict(), **overrides}), None
        else:
            cfg, name = CLIPConfig(**{**config, **overrides}), None
        if name is None:
            name = next((k for k, v in CONFIGS.items() if v == cfg), "custom")
        return cls(cfg, name=name)

    # -- Backbone interface -------------------------------------------------------------------
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        from rsitr.models.clip.tokenizer import tokenize

        return tokenize(texts, context_length=self.context_length)

    def image_features(self, pixels: torch.Tensor) -> Features:
        pooled, tokens = self.visual(pixels)
        return Features(pooled, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def text_features(self, ids: torch.Tensor) -> Features:
        if ids.shape[1] > self.context_length:
            raise RsitrError(f"text ids have length {ids.shape[1]} > context length {self.context_length}")
        n = ids.shape[1]
        valid = ids != self.pad_id
        x = self.token_embedding(ids) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        x = self.transformer(x, self.attn_mask[:n, :n].to(x.dtype), valid)
        x = self.ln_final(x) @ self.text_projection
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return Features(pooled, x, valid)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)[0]

    def adapter_slots(self, modality: str) -> AdapterSlots:
        """The residual blocks of the ViT (``"image"``) or of the text transformer (``"text"``); each
        block's ``adapter`` slot is applied to the block output."""
        t = self.visual.transformer if check_modality(modality) == "image" else self.transformer
        return AdapterSlots("blocks", tuple(t.resblocks), (t.width,) * len(t.resblocks))

    def attention_projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's fused q/k/v attention (``"qkv"``, with its ``lora`` slot) and ``out_proj`` (``"o"``)."""
        if not isinstance(block, ResidualAttentionBlock):
            raise RsitrError(f"not a CLIP residual block: {type(block).__name__}")
        return {"qkv": block.attn, "o": block.attn.out_proj}

    def trainable_groups(self, mode: str) -> dict[str, list[nn.Parameter]]:
        """``full``: everything; ``locked-image``: text tower + projections + temperature (LiT);
        ``heads``: the two projections + temperature; ``frozen``: nothing (adapters only)."""
        text = [p for n, p in self.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
        if mode == "full":
            return {"all": list(self.parameters())}
        if mode == "locked-image":
            return {"text": text, "image_proj": [self.visual.proj], "temperature": [self.logit_scale]}
        if mode == "heads":
            return {"proj": [self.visual.proj, self.text_projection], "temperature": [self.logit_scale]}
        if mode == "frozen":
            return {}
        raise RsitrError(f"unknown fine-tuning mode {mode!r}; use full, locked-image, heads or frozen")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable
