"""PEFT baselines for RDB's comparison: a plain bottleneck adapter and LoRA, both trained with
the base method's symmetric InfoNCE loss (:class:`rsitr.methods.base.Method`).

``method.name: adapter`` -- :class:`BottleneckAdapterMethod`
------------------------------------------------------------
A *symmetric* bottleneck adapter (Houlsby et al. 2019, Sec. 2.1; AdaptFormer, Chen et al. 2022,
for the ``scale`` factor)::

    out = x + scale * Up(GELU(Down(LN(x))))      # Up zero-initialised: identity at the start

in the slots the backbone declares (:meth:`rsitr.models.base.Backbone.adapter_slots`, as RDB): each chosen transformer block
of both towers gets one adapter on its output (the block's ``adapter`` slot); a tower without
transformer blocks (the two-tower backbone's CNN) gets one adapter in its token slot over the
spatial tokens ``[B, HW, C]`` before pooling (``needs_tokens`` is then True). The bottleneck
width is the same on both sides. Padding positions are returned unchanged.
*Our choices* (documented flags): the adapter sits after the whole block (sequential, the slot
the backbones provide) rather than parallel to the MLP as in AdaptFormer; ``layernorm`` (true)
puts a LayerNorm before the down-projection (Houlsby's adapters have none, AdaptFormer's has one).

Options: ``bottleneck`` (64), ``layers`` ("all" | "last_half" | "none" | list of block indices,
negative from the end, applied to both towers; for a token slot any spec but "none" switches it
on), ``scale`` (1.0; AdaptFormer uses 0.1), ``layernorm`` (true).

``method.name: lora`` -- :class:`LoRAMethod`
--------------------------------------------
LoRA (Hu et al. 2022, Sec. 4.1, Eq. 3) on the attention projections of the transformer blocks::

    h = W0 x + (alpha / r) * B A x        # A: r x d_in (Kaiming-uniform), B: d_out x r (zeros)

applied merge-free: the delta is computed in the forward pass, ``W0`` is never modified. Each
targeted projection has its own ``(A, B)``; the projections are the ones the backbone declares
(:meth:`rsitr.models.base.Backbone.attention_projections`). A fused q/k/v projection (CLIP's
``in_proj_weight``) gets separate q / k / v pairs whose deltas are concatenated (so the parameter
count equals that of separate q/k/v Linears, as in MiniLM's BERT attention) and put into its
``lora`` slot; a separate projection (``nn.Linear``; ``"o"`` is CLIP's ``out_proj`` or BERT's
``attention.output.dense``) has its class swapped to a LoRA-aware subclass with the pair as its
child ``lora``. The modules keep their parameter names, so pretrained state dicts still load, and
the LoRA tensors are saved with the backbone state (``...attn.lora.parts.q.A``).
A tower without attention blocks (the CNN image tower) gets nothing (logged).

Options: ``rank`` (8), ``alpha`` (16), ``targets`` ("qkv"; "qkvo" adds the output projection;
any non-empty subset of the letters q, k, v, o is accepted, e.g. "qv" as in Hu et al.),
``layers`` (as above).

Both methods keep their modules as submodules of the method (so the loop trains them in every
``model.mode``) *and* of the backbone; their tensors are saved once, under ``backbone.*``, as for
RDB (see :mod:`rsitr.methods.rdb`): the method's own ``state_dict`` leaves them out and its
``load_state_dict`` does not ask for them.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.methods.rdb import _wanted, resolve_layers
from rsitr.models.base import Backbone
from rsitr.methods.base import Capabilities, Method, register_method
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


@dataclass
class AdapterOptions:
    """``method.name: adapter`` options (see the module doc)."""

    RANGES: ClassVar[dict] = {"bottleneck": (1, None, False)}  # checked when read (rsitr.utils.config)
    FINITE: ClassVar[bool] = True

    bottleneck: int = 64
    layers: Any = "all"
    scale: float = 1.0
    layernorm: bool = True


@dataclass
class LoRAOptions:
    """``method.name: lora`` options (see the module doc)."""

    RANGES: ClassVar[dict] = {"rank": (1, None, False), "alpha": (0, None, True)}  # checked when read (rsitr.utils.config)
    FINITE: ClassVar[bool] = True

    rank: int = 8
    alpha: float = 16.0
    targets: str = "qkv"
    layers: Any = "all"


class _InstalledModules(Method):
    """Base of methods whose modules (in the ModuleLists named by ``INSTALLED``) also live in the
    backbone: their tensors are saved with the backbone only (see the module doc)."""

    INSTALLED: tuple[str, ...] = ()
    combinable = False  # combo composes RDB, iEBAKER, FTF and the baseline

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data=None):
        super().__init__(backbone, options, train_data)
        self._installed = False
        self._token_slot = False  # a module over a token slot (CNN tower): cached trunk features keep their tokens
        self._key_re = re.compile(r"(^|\.)(" + "|".join(self.INSTALLED) + r")\.\d+\.")
        self.register_state_dict_post_hook(_InstalledModules._drop_installed)
        self.register_load_state_dict_post_hook(_InstalledModules._ignore_installed)

    @staticmethod
    def _drop_installed(module: "_InstalledModules", state: dict, prefix: str, local_metadata) -> None:
        if module._installed:
            for k in [k for k in state if k.startswith(tuple(f"{prefix}{n}." for n in module.INSTALLED))]:
                del state[k]

    @staticmethod
    def _ignore_installed(module: "_InstalledModules", incompatible) -> None:
        if module._installed:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not module._key_re.search(k)]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(train_tokens=self._token_slot)


# -- the plain bottleneck adapter ------------------------------------------------------------------
class BottleneckAdapter(nn.Module):
    """``x + scale * Up(GELU(Down(LN(x))))`` with ``Up`` zero-initialised (the slot protocol:
    ``adapter(x, valid) -> x``, residual included, padding positions unchanged)."""

    def __init__(self, width: int, bottleneck: int = 64, scale: float = 1.0, layernorm: bool = True):
        super().__init__()
        if bottleneck < 1:
            raise RsitrError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.width, self.bottleneck, self.scale = width, bottleneck, float(scale)
        self.norm = nn.LayerNorm(width) if layernorm else nn.Identity()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        out = x + self.scale * self.up(self.act(self.down(self.norm(x))))
        if valid is not None:
            out = torch.where(valid[..., None], out, x)
        return out


@register_method
class BottleneckAdapterMethod(_InstalledModules):
    """Symmetric bottleneck adapters in every chosen block of both towers (see the module doc)."""

    name = "adapter"
    label = "adapter"
    Options = AdapterOptions
    INSTALLED = ("image_adapters", "text_adapters")

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data=None):
        super().__init__(backbone, options, train_data)
        o = self.opts
        self.image_adapters = nn.ModuleList()
        self.text_adapters = nn.ModuleList()
        self._targets: dict[str, list[int | None]] = {"image": [], "text": []}
        for modality, adapters in (("image", self.image_adapters), ("text", self.text_adapters)):
            found = backbone.adapter_slots(modality)
            if found is None:
                if _wanted(o.layers, "layers"):
                    log.warning("adapter: backbone %s has no adapter slots for the %s tower; none installed", backbone.info.name, modality)
                continue
            if found.kind == "blocks":
                idx = resolve_layers(o.layers, len(found), "layers")
                widths = [found.widths[i] for i in idx]
            elif _wanted(o.layers, "layers"):
                idx, widths = [None], [found.widths[0]]
                self._token_slot = True  # the token slot adapts cached trunk tokens
            else:
                idx, widths = [], []
            for w in widths:
                adapters.append(BottleneckAdapter(w, int(o.bottleneck), float(o.scale), bool(o.layernorm)))
            self._targets[modality] = list(idx)
        log.info("adapter: %d image / %d text bottleneck adapters (r=%d), %s params", len(self.image_adapters), len(self.text_adapters),
                 int(o.bottleneck), f"{sum(p.numel() for p in self.parameters() if p is not self.logit_scale):,}")

    def install(self, backbone: Backbone) -> None:
        """Put the adapters into the backbone's slots (idempotent; also at load time)."""
        for modality, adapters in (("image", self.image_adapters), ("text", self.text_adapters)):
            found = backbone.adapter_slots(modality)
            if found is not None:  # adapters of an earlier install do not survive this one
                for owner in found.owners:
                    if isinstance(owner.adapter, BottleneckAdapter):
                        owner.adapter = None
            targets = self._targets[modality]
            if not targets:
                continue
            if found is None:
                raise RsitrError(f"adapter: backbone {backbone.info.name} has no {modality} adapter slots")
            for a, t in zip(adapters, targets):
                if (t is None) != (found.kind == "token") or (t is not None and t >= len(found)):
                    raise RsitrError(f"adapter: the {modality} tower of {backbone.info.name} does not match the adapters built for it")
                found.owners[0 if t is None else t].adapter = a
        self._installed = True


# -- LoRA ---------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """One low-rank update ``(alpha / r) * B A x`` (Hu et al. 2022, Eq. 3); B starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank < 1:
            raise RsitrError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.scaling = int(rank), float(alpha) / int(rank)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the reference implementation's init of A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scaling


class FusedQKVLoRA(nn.Module):
    """Separate q / k / v LoRA pairs for a fused ``[3W, W]`` input projection; the delta of a
    projection without a pair is zero."""

    def __init__(self, width: int, letters: str, rank: int, alpha: float):
        super().__init__()
        self.width = width
        self.parts = nn.ModuleDict({c: LoRA(width, width, rank, alpha) for c in "qkv" if c in letters})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = None
        out = []
        for c in "qkv":
            if c in self.parts:
                out.append(self.parts[c](x))
            else:
                if zeros is None:
                    zeros = x.new_zeros(*x.shape[:-1], self.width)
                out.append(zeros)
        return torch.cat(out, dim=-1)


class LoRALinear(nn.Linear):
    """``nn.Linear`` + its child ``lora`` (class swapped in by :class:`LoRAMethod`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora(x)


def _strip_lora(module: nn.Module) -> None:
    """Undo an install on one declared projection: empty a fused projection's ``lora`` slot, or
    restore a swapped ``nn.Linear``'s class and drop its ``lora`` child."""
    if isinstance(module, LoRALinear):
        module.__class__ = nn.Linear
        del module._modules["lora"]
    elif module._modules.get("lora") is not None:
        module.lora = None


@register_method
class LoRAMethod(_InstalledModules):
    """LoRA on the attention projections of the chosen blocks of both towers (see the module doc)."""

    name = "lora"
    label = "lora"
    Options = LoRAOptions
    INSTALLED = ("lora",)

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data=None):
        super().__init__(backbone, options, train_data)
        o = self.opts
        letters = str(o.targets).lower()
        if not letters or set(letters) - set("qkvo") or len(set(letters)) != len(letters):
            raise RsitrError(f"LoRA option targets must be letters from q, k, v, o (e.g. 'qkv', 'qkvo'), got {o.targets!r}")
        self.letters = "".join(c for c in "qkvo" if c in letters)
        rank, alpha = int(o.rank), float(o.alpha)
        if rank < 1:
            raise RsitrError(f"LoRA rank must be >= 1, got {o.rank!r}")
        self.lora = nn.ModuleList()
        self._targets: list[tuple[str, int, str]] = []  # (modality, block, "qkv" | "q" | ... | "o")
        for modality in ("image", "text"):
            found = backbone.adapter_slots(modality)
            if found is None or found.kind != "blocks":
                if _wanted(o.layers, "layers"):
                    log.info("LoRA: the %s tower of %s has no attention blocks (e.g. a CNN): no LoRA there", modality, backbone.info.name)
                continue
            for i in resolve_layers(o.layers, len(found), "layers"):
                proj = backbone.attention_projections(found.owners[i])
                if "qkv" in proj:
                    fused = proj["qkv"]
                    qkv = "".join(c for c in self.letters if c in "qkv")
                    if qkv:
                        self.lora.append(FusedQKVLoRA(fused.in_proj_weight.shape[1], qkv, rank, alpha))
                        self._targets.append((modality, i, "qkv"))
                for c in self.letters:
                    if c in proj:
                        lin = proj[c]
                        self.lora.append(LoRA(lin.in_features, lin.out_features, rank, alpha))
                        self._targets.append((modality, i, c))
        n = sum(p.numel() for p in self.lora.parameters())
        log.info("LoRA: rank %d, alpha %g, targets %s on %d projections (%s params)", rank, alpha, self.letters, len(self._targets), f"{n:,}")

    def install(self, backbone: Backbone) -> None:
        """Attach the LoRA pairs to their projections (idempotent; also at load time)."""
        for modality in ("image", "text"):
            found = backbone.adapter_slots(modality)
            if found is not None and found.kind == "blocks":
                for block in found.owners:
                    for m in backbone.attention_projections(block).values():
                        _strip_lora(m)
        for unit, (modality, i, what) in zip(self.lora, self._targets):
            found = backbone.adapter_slots(modality)
            if found is None or found.kind != "blocks" or i >= len(found):
                raise RsitrError(f"LoRA: the {modality} tower of {backbone.info.name} does not match the LoRA built for it")
            proj = backbone.attention_projections(found.owners[i])
            if what not in proj:
                raise RsitrError(f"LoRA: block {i} of the {modality} tower of {backbone.info.name} has no {what!r} projection")
            target = proj[what]
            if what == "qkv":
                target.lora = unit  # the fused projection's declared delta slot
                continue
            if type(target) is not nn.Linear:
                raise RsitrError(f"LoRA: projection {what!r} of block {i} is a {type(target).__name__}, not a plain nn.Linear")
            target.__class__ = LoRALinear
            target.lora = unit
        self._installed = True
