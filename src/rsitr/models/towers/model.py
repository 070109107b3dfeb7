"""The two-tower backbone: an EfficientNet-Lite image trunk and a MiniLM text trunk, each
followed by a projection head into a shared ``embed_dim`` space (LiT-style, Zhai et al. 2022).

Trunk outputs (what the training loop caches when a trunk is frozen):

* image: the last feature map ``[B, 1280, h, w]`` (``h = w = image_size / 32``, rounded up)
  flattened to spatial tokens ``[B, h*w, 1280]`` (mask all True); pooled = their average
  (global average pooling, as the ImageNet classifier does);
* text: the last hidden states ``[B, L, 384]``; pooled = their mean over the real tokens
  ([CLS] and [SEP] included, padding excluded), sentence-transformers' pooling for
  all-MiniLM-L6-v2. The token mask marks the word pieces only: [CLS], [SEP] and padding are
  False, and tokens stay position-aligned with the ids (``tokens[:, i]`` is ``ids[:, i]``).

Heads (:class:`Projection`): ``LayerNorm(width) -> Linear(width, embed_dim)``, one per
modality, shared between the pooled vector and the tokens of that modality. The LayerNorm
puts both trunks' very differently scaled features (ReLU6 activations vs BERT hidden states)
on one scale, so one learning rate suits both heads. Both heads are initialised from the
global torch RNG (weights ``N(0, width^-1/2)``, zero bias, unit LayerNorm), right after
``torch.manual_seed`` the same seed gives the same heads; the trunks' throw-away random
initialisation runs under a forked RNG so it does not shift the global stream.

Fine-tuning modes (:meth:`TwoTower.trainable_groups`): ``heads`` (the two heads), ``locked-image``
(LiT: text trunk + heads), ``full`` (everything), ``frozen`` (nothing: method modules only) and
``top:I,T`` (the top of each trunk + heads, trained through cached activations, below).
The ImageNet classifier ``_fc`` and BERT's ``pooler`` are loaded (so the shipped weights load
strictly) but never used for retrieval: they are frozen and in no group.

A trunk none of whose parameters requires grad is kept in eval mode even when the model is
put in training mode (``model.train()``): its batch-norm statistics are not updated and its
dropout is off, so its outputs equal the cached features. A trainable EfficientNet trunk trains
its batch norms in batch mode (use reasonably large batches in ``full`` mode).

Top mode ``top:I,T`` (``top:I`` = ``top:I,0``; :meth:`TwoTower.set_mode` moves the cut points):
the last ``I`` of EfficientNet-Lite's 7 stages plus its head convolution (``_conv_head``,
``_bn1``), and the last ``T`` of MiniLM's layers, train with the heads; everything below stays
frozen. The *trunk* then ends at the cut, so the loop's frozen-trunk cache holds the activations
entering the first trained block (image: ``[B, h*w, C]`` tokens of the ``C x h x w`` map, e.g.
Lite0 ``top:2`` = 112 x 14 x 14 entering block 11; text: the hidden states ``[B, L, 384]``
after layer ``6 - T`` with the mask of the real tokens, [CLS]/[SEP] included), stored in fp16, and
the *head* runs the trained blocks, the pooling and the projection every step
(``image_head(image_trunk(x)) == image_features(x)`` for every cut). ``I = 0`` / ``T = 0`` keeps
that tower's trunk whole (nothing of it trains). Below the cut a trunk stays in eval mode.
Batch norm of the trained blocks: by default frozen (eval mode: the ImageNet running statistics,
its affine weights still train), which keeps cached and live features consistent and small
batches harmless; ``top:I,T+bn`` trains it in batch mode (batch statistics, running statistics
updated and checkpointed). Dropout / stochastic depth of the trained blocks are on in training, as
in the towers' own training. The cut is stored as ``model.mode`` in checkpoints and restored on
load, so a loaded model's trunk (and any trunk cache of it) ends at the same cut.

There is no temperature here; the method adds its own.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from rsitr.models.base import AdapterSlots, BackboneCapabilities, BackboneInfo, Features, PreprocessConfig, SplitBackbone, check_modality
from rsitr.models.towers.efficientnet_lite import CONFIGS as LITE_CONFIGS
from rsitr.models.towers.efficientnet_lite import MEAN, STD, STAGES, EfficientNetLite, LiteConfig
from rsitr.models.towers.minilm import DEFAULT_MAX_LENGTH, BertConfig, MiniLM, WordPieceTokenizer, bert_attention_projections, mean_pool, pad_trim
from rsitr.utils.errors import RsitrError

MODES = ("heads", "locked-image", "full", "frozen", "top:I,T")
_TOP = re.compile(r"^top:(\d+)(?:,(\d+))?(\+bn)?$")


def parse_top_mode(mode: str, n_layers: int) -> tuple[int, int, bool] | None:
    """``"top:I,T[+bn]"`` -> ``(I, T, bn_batch)`` (image stages, text layers, batch-mode BN);
    None for the other modes. Raises on a malformed or out-of-range top mode."""
    if not isinstance(mode, str) or not mode.startswith("top"):
        return None
    m = _TOP.match(mode.strip())
    if not m:
        raise RsitrError(f"model.mode {mode!r}: a top mode reads 'top:I,T' (I of the {len(STAGES)} image stages, T of the {n_layers} text layers), e.g. 'top:2,1', optionally '+bn'")
    i, t = int(m.group(1)), int(m.group(2) or 0)
    if not 0 <= i <= len(STAGES) or not 0 <= t <= n_layers:
        raise RsitrError(f"model.mode {mode!r}: I must be 0..{len(STAGES)} image stages and T 0..{n_layers} text layers")
    if i == 0 and t == 0:
        raise RsitrError(f"model.mode {mode!r} trains no trunk block: use model.mode heads")
    return i, t, m.group(3) is not None

class Projection(nn.Module):
    """``LayerNorm(width) -> Linear(width, dim)``, applied to the last axis."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, dim)
        nn.init.normal_(self.linear.weight, std=width ** -0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class AdapterSlot(nn.Module):
    """Identity until a method puts an adapter in it: ``adapter(x, valid) -> x``."""

    def __init__(self):
        super().__init__()
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return x if self.adapter is None else self.adapter(x, valid)


class TwoTower(SplitBackbone):
    """EfficientNet-Lite + MiniLM dual encoder implementing :class:`~rsitr.models.base.Backbone`
    and the trunk/head split used by the frozen-feature cache (:class:`~rsitr.models.base.SplitBackbone`)."""

    capabilities = BackboneCapabilities(trunk_cache=True, modes=MODES, adapter_slots={"image": "token", "text": "blocks"})

    def __init__(
        self,
        image: LiteConfig | str = "efficientnet-lite0",
        text: BertConfig | None = None,
        tokenizer: WordPieceTokenizer | None = None,
        *,
        embed_dim: int = 256,
        context_length: int | None = None,
        name: str | None = None,
        weights: dict | None = None,
    ):
        super().__init__()
        image_cfg = LITE_CONFIGS[image] if isinstance(image, str) else image
        text_cfg = text or BertConfig()
        if tokenizer is not None and context_length is not None and tokenizer.max_length != context_length:
            raise ValueError(f"context_length {context_length} != tokenizer max_length {tokenizer.max_length}")
        self.embed_dim = int(embed_dim)
        self.context_length = int(tokenizer.max_length if tokenizer is not None else (context_length or DEFAULT_MAX_LENGTH))
        if self.context_length > text_cfg.max_position_embeddings:
            raise ValueError(f"context_length {self.context_length} > {text_cfg.max_position_embeddings} BERT positions")
        self.pad_id = text_cfg.pad_token_id
        self._tokenizer = tokenizer
        self.cls_id = tokenizer.cls_id if tokenizer is not None else 101
        self.sep_id = tokenizer.sep_id if tokenizer is not None else 102
        self.preprocess = PreprocessConfig(image_size=image_cfg.image_size, mean=MEAN, std=STD, interpolation="bicubic", resize_mode="shortest")

        # heads first, from the global RNG; the trunks' random init (overwritten by the
        # pretrained weights) must not move the global stream
        self.image_proj = Projection(image_cfg.head_channels, self.embed_dim)
        self.text_proj = Projection(text_cfg.hidden_size, self.embed_dim)
        # image-side adapters act on the CNN's last feature map as spatial tokens, after the
        # (cacheable) trunk and before pooling: see adapter_slots
        self.image_token_slot = AdapterSlot()
        with torch.random.fork_rng(devices=[]):
            self.image_tower = EfficientNetLite(image_cfg)
            self.text_tower = MiniLM(text_cfg)
        for p in list(self.image_tower._fc.parameters()) + list(self.text_tower.pooler.parameters()):
            p.requires_grad_(False)
        # cut points (top mode, see set_mode): the image trunk ends before block _image_cut, the
        # text trunk after layer _text_cut - 1; None = the whole tower is trunk
        self._image_cut: int | None = None
        self._text_cut: int | None = None
        self._top_stages = self._top_layers = 0  # what trains above the cuts
        self._bn_batch = False
        self.mode = "heads"

        self.info = BackboneInfo(
            kind="towers",
            name=name or f"{image_cfg.name}+minilm-l{text_cfg.num_hidden_layers}",
            config={
                "image": image_cfg.name,
                "text": f"minilm-l{text_cfg.num_hidden_layers}",
                "embed_dim": self.embed_dim,
                "context_length": self.context_length,
                "image_size": image_cfg.image_size,
                "image_width": image_cfg.head_channels,
                "text_width": text_cfg.hidden_size,
                "head": "layernorm+linear",
                "image_config": image_cfg.to_dict(),
                "text_config": text_cfg.to_dict(),
            },
            weights=dict(weights or {}),
        )

    # -- trunks and heads ---------------------------------------------------------------------
    def _image_trunk_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.image_tower.named_parameters() if not n.startswith("_fc.")]

    def _text_trunk_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.text_tower.named_parameters() if not n.startswith("pooler.")]

    def _image_top_modules(self, stages: int) -> list[nn.Module]:
        """The image tower above a cut ``stages`` stages from the top (head conv included)."""
        if stages == 0:
            return []
        cut = self.image_tower.stage_starts[len(STAGES) - stages]
        return [*self.image_tower._blocks[cut:], self.image_tower._conv_head, self.image_tower._bn1]

    def _text_top_modules(self, layers: int) -> list[nn.Module]:
        n = len(self.text_tower.encoder.layer)
        return list(self.text_tower.encoder.layer[n - layers:]) if layers else []

    def _below_cut(self, modality: str) -> list[nn.Parameter]:
        """Parameters the trunk (what gets cached) computes with: the whole tower without a cut."""
        if check_modality(modality) == "image":
            params, top = self._image_trunk_params(), self._image_top_modules(self._top_stages)
        else:
            params, top = self._text_trunk_params(), self._text_top_modules(self._top_layers)
        above = {id(p) for m in top for p in m.parameters()}
        return [p for p in params if id(p) not in above]

    def set_mode(self, mode: str) -> None:
        """Move the cut points for ``mode``: a top mode ``top:I,T`` puts them below the trained
        blocks (see the module doc); every other mode keeps the whole towers as trunks. Only the
        trunk/head split changes (``image_features`` is the same function); which parameters
        train is :meth:`trainable_groups`."""
        top = parse_top_mode(mode, len(self.text_tower.encoder.layer))
        self.mode = str(mode)
        if top is None:
            self._image_cut = self._text_cut = None
            self._top_stages = self._top_layers = 0
            self._bn_batch = False
            return
        i, t, bn = top
        self._top_stages, self._top_layers = i, t
        self._image_cut = self.image_tower.stage_starts[len(STAGES) - i] if i else None
        self._text_cut = len(self.text_tower.encoder.layer) - t if t else None
        self._bn_batch = bn

    def trunk_cut(self, modality: str) -> str | None:
        """Where that trunk ends (part of trunk-cache keys), None for the whole tower. A trunk
        with a cut returns activations that only its head can use (the cache keeps them)."""
        if modality == "image":
            return None if self._image_cut is None else f"block{self._image_cut}"
        if modality == "text":
            return None if self._text_cut is None else f"layer{self._text_cut}"
        raise RsitrError(f"modality must be 'image' or 'text', got {modality!r}")

    def image_trunk(self, pixels: torch.Tensor) -> Features:
        """Trunk features: pooled ``[B, 1280]`` (GAP), tokens ``[B, h*w, 1280]``, mask all True.
        With a cut (top mode): the activations entering the first trained block as tokens
        ``[B, h*w, C]`` (pooled: their mean, unused by the head)."""
        if self._image_cut is None:
            fmap = self.image_tower.forward_features(pixels)
        else:
            fmap = self.image_tower.forward_bottom(pixels, self._image_cut)
        tokens = fmap.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Features(tokens.mean(dim=1), tokens, mask)

    def _image_top(self, f: Features) -> Features:
        """The trained image blocks above the cut on cut activations -> last-map trunk features."""
        b, n, c = f.tokens.shape
        if n == 0:
            raise RsitrError("the image trunk ends at a cut (top mode) but the given trunk features have no tokens")
        side = math.isqrt(n)
        if side * side != n:
            raise RsitrError(f"image trunk tokens at the cut must form a square map, got {n} positions")
        fmap = self.image_tower.forward_top(f.tokens.transpose(1, 2).reshape(b, c, side, side), self._image_cut)
        tokens = fmap.flatten(2).transpose(1, 2)
        return Features(tokens.mean(dim=1), tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def text_trunk(self, ids: torch.Tensor, core=None) -> Features:
        """Trunk features: pooled ``[B, 384]`` (mean over non-pad tokens), tokens ``[B, L, 384]``
        aligned with ``ids``, mask True on word pieces (not [CLS]/[SEP]/padding). With a text cut
        (top mode): the hidden states after the last layer below the cut, mask True on every real
        token ([CLS]/[SEP] included: the attention mask the trained layers need).

        BERT runs only over the columns that hold real tokens (padding is masked anyway);
        ``core`` replaces :meth:`text_trunk_core` on those columns (the inference engine passes
        its ONNX graph of it)."""
        if ids.dim() != 2:
            raise RsitrError(f"text ids must be [B, L], got shape {tuple(ids.shape)}")
        n = pad_trim(ids, self.pad_id)
        f = (core or self.text_trunk_core)(ids[:, :n])
        if n < ids.shape[1]:
            pad = ids.shape[1] - n
            f = Features(f.pooled, torch.nn.functional.pad(f.tokens, (0, 0, 0, pad)), torch.nn.functional.pad(f.mask, (0, pad), value=False))
        return f

    def text_trunk_core(self, ids: torch.Tensor) -> Features:
        """:meth:`text_trunk` without the trimming of padding columns: no data-dependent shapes
        (what the inference engine exports; with a cut it ends there, and the cut is part of the
        engine's graph key)."""
        valid = ids != self.pad_id
        hidden = self.text_tower(ids, valid, layers=self._text_cut)
        pooled = mean_pool(hidden, valid)
        if self._text_cut is not None:
            # top mode: hidden states after layer _text_cut - 1; the mask is the attention mask
            return Features(pooled, hidden, valid)
        words = valid & (ids != self.cls_id) & (ids != self.sep_id)
        return Features(pooled, hidden, words)

    def _text_top(self, f: Features, trim: bool = True) -> Features:
        """The trained MiniLM layers above the cut -> last-layer trunk features (mean pooled,
        word mask: the real tokens without the first ([CLS]) and the last ([SEP]) of each row).
        ``trim=False`` runs every column (no data-dependent shape: the exported graph's path)."""
        if f.tokens.shape[1] == 0:
            raise RsitrError("the text trunk ends at a cut (top mode) but the given trunk features have no tokens")
        valid = f.mask
        if trim:
            n = pad_trim(valid.to(torch.long), 0)
            hidden = self.text_tower.forward_top(f.tokens[:, :n], valid[:, :n], self._text_cut)
            if n < f.tokens.shape[1]:
                hidden = torch.nn.functional.pad(hidden, (0, 0, 0, f.tokens.shape[1] - n))
        else:
            hidden = self.text_tower.forward_top(f.tokens, valid, self._text_cut)
        pos = torch.arange(valid.shape[1], device=valid.device)
        last = valid.sum(dim=1, keepdim=True) - 1
        words = valid & (pos != 0) & (pos != last)
        return Features(mean_pool(hidden, valid), hidden, words)

    def image_head(self, f: Features) -> Features:
        if self._image_cut is not None:
            f = self._image_top(f)
        if self.image_token_slot.adapter is not None:
            if f.tokens.shape[1] == 0:
                raise RsitrError("an image token adapter is installed but the cached trunk features have no tokens (method.needs_tokens must be True)")
            tokens = self.image_token_slot(f.tokens, f.mask)
            return Features(self.image_proj(tokens.mean(dim=1)), self.image_proj(tokens), f.mask)
        return Features(self.image_proj(f.pooled), self.image_proj(f.tokens), f.mask)

    # -- adapter slots (parameter-efficient methods) -------------------------------------------
    def adapter_slots(self, modality: str) -> AdapterSlots | None:
        """``"text"``: MiniLM's layers, one ``adapter`` slot each (applied to the layer output);
        ``"image"`` (a CNN): one token slot over the spatial tokens ``[B, h*w, 1280]`` after the
        trunk, so frozen-trunk features stay cacheable; the pooled embedding becomes the mean of
        the adapted tokens."""
        if check_modality(modality) == "text":
            layers = tuple(self.text_tower.encoder.layer)
            return AdapterSlots("blocks", layers, (self.text_tower.cfg.hidden_size,) * len(layers))
        return AdapterSlots("token", (self.image_token_slot,), (int(self.info.config["image_width"]),))

    def attention_projections(self, block: nn.Module) -> dict[str, nn.Module]:
        """BERT's separate query/key/value Linears and the attention output dense layer."""
        return bert_attention_projections(block)

    def text_head(self, f: Features, trim: bool = True) -> Features:
        if self._text_cut is not None:
            f = self._text_top(f, trim=trim)
        return Features(self.text_proj(f.pooled), self.text_proj(f.tokens), f.mask)

    def trunk_modules(self, modality: str) -> list[nn.Module]:
        """The whole tower of ``modality`` (its tensors key the engine's exported trunk graphs)."""
        return [self.image_tower] if check_modality(modality) == "image" else [self.text_tower]

    def text_pad_token(self) -> torch.Tensor:
        """The token feature :meth:`text_features` gives a padding column past the longest caption
        of a batch (the trunk pads with zeros, the head projects them): ``[embed_dim]``."""
        w = self.text_proj.norm.normalized_shape[0]
        return self.text_proj(self.text_proj.norm.weight.new_zeros(w))

    def text_features_core(self, ids: torch.Tensor) -> Features:
        """:meth:`text_features` without the trimming of padding columns (no data-dependent
        shapes): what the inference engine exports as the one text graph of a model; equal to
        :meth:`text_features` on ids whose last column holds a real token."""
        return self.text_head(self.text_trunk_core(ids), trim=False)

    def trunk_trainable(self, modality: str) -> bool:
        """True iff any parameter of that trunk (``"image"`` or ``"text"``; in top mode the part
        below the cut) requires grad."""
        return any(p.requires_grad for p in self._below_cut(modality))

    # -- Backbone interface -----------------------------------------------------------------
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        if self._tokenizer is None:
            raise RsitrError("this two-tower model was built without a tokenizer (use rsitr.models.towers.load_towers)")
        return self._tokenizer(texts)

    def trainable_groups(self, mode: str) -> dict[str, list[nn.Parameter]]:
        """``heads``: the two projection heads; ``locked-image``: text trunk + heads (LiT);
        ``full``: both trunks + heads; ``frozen``: nothing; ``top:I,T``: the last I image stages
        with the head conv (group ``image``) and the last T text layers (group ``text``) + heads."""
        heads = {"image_head": list(self.image_proj.parameters()), "text_head": list(self.text_proj.parameters())}
        top = parse_top_mode(mode, len(self.text_tower.encoder.layer))
        if top is not None:
            groups = {}
            for name, modules in (("image", self._image_top_modules(top[0])), ("text", self._text_top_modules(top[1]))):
                params = [p for m in modules for p in m.parameters()]
                if params:
                    groups[name] = params
            return {**groups, **heads}
        if mode == "heads":
            return heads
        if mode == "locked-image":
            return {"text": self._text_trunk_params(), **heads}
        if mode == "full":
            return {"image": self._image_trunk_params(), "text": self._text_trunk_params(), **heads}
        if mode == "frozen":
            return {}
        raise RsitrError(f"unknown fine-tuning mode {mode!r}; use one of {', '.join(MODES)}")

    def train(self, mode: bool = True) -> "TwoTower":
        """As ``nn.Module.train``, but a frozen trunk stays in eval mode (see the module doc)."""
        super().train(mode)
        if not mode:
            return self
        top_image, top_text = self._image_top_modules(self._top_stages), self._text_top_modules(self._top_layers)
        for modality, tower, top in (("image", self.image_tower, top_image), ("text", self.text_tower, top_text)):
            if not self.trunk_trainable(modality):
                tower.eval()
                # above the cut: a block trains iff it has trainable parameters
                for m in top:
                    m.train(any(p.requires_grad for p in m.parameters()))
        if top_image and not self._bn_batch:
            for m in top_image:
                for bn in m.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.eval()  # frozen batch norm: running statistics, affine weights train
        return self
