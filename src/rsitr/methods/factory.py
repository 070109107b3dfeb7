"""One factory for every model source: ``load(source) -> LoadedModel(backbone, method, preprocess)``.

``source`` is a shipped model (``shipped:NAME``, :mod:`rsitr.models.shipped`), a backbone spec (``towers:NAME``, ``clip:CONFIG``, a CLIP checkpoint path; see
:mod:`rsitr.models.registry`) or an rsitr training checkpoint (a file, or a run folder: its best,
else last checkpoint). A training checkpoint comes back with the method it was trained with --
rebuilt from its stored name and options, its adapters installed in the backbone, its trained
state loaded -- so evaluation, search, serving and benchmarks score through that method. A
plain backbone comes back with ``method=None`` (cosine of the pooled embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rsitr.data.transforms import PreprocessConfig
from rsitr.methods.base import Method, build_method
from rsitr.models.base import Backbone
from rsitr.models.checkpoint import TrainCheckpoint
from rsitr.models.registry import build_backbone, parse_spec, rebuild_backbone
from rsitr.utils.errors import CheckpointError


@dataclass
class LoadedModel:
    """A backbone, the method that scores with it (None: a plain backbone), and its eval-time
    preprocessing. ``trained`` is the checkpoint's ``{"name", "options"}`` record (None for a
    plain backbone)."""

    backbone: Backbone
    method: Method | None
    source: str
    trained: dict[str, Any] | None = None

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backbone.preprocess

    def eval(self) -> "LoadedModel":
        self.backbone.eval()
        if self.method is not None:
            self.method.eval()
        return self


def load(source, device: str = "cpu", *, quick_gelu: bool | None = None, embed_dim: int = 256, seed: int | None = None) -> LoadedModel:
    """The model of ``source`` (see the module doc), on ``device``. ``seed`` seeds the random
    initialisation of ``clip:CONFIG`` specs."""
    from rsitr.models.shipped import SHIPPED_DIR, PREFIX, resolve, shipped_checkpoint

    found = resolve(source)
    if found is not None:
        name, root = found
        label = PREFIX + name if root == SHIPPED_DIR else str(source)
        return from_checkpoint(shipped_checkpoint(name, root), device=device, source=label)
    spec = parse_spec(source)
    ckpt = TrainCheckpoint.probe(spec.name) if spec.is_path else None  # one open: a checkpoint, or None for another file
    if ckpt is not None:
        return from_checkpoint(ckpt, device=device, source=str(source))
    backbone = build_backbone(spec, device, quick_gelu=quick_gelu, embed_dim=embed_dim, seed=seed)
    return LoadedModel(backbone, None, str(source))


def load_model(source, device: str = "cpu", *, quick_gelu: bool | None = None, embed_dim: int = 256) -> Backbone:
    """The backbone of :func:`load` (a training checkpoint's with its adapters and trained tensors)."""
    return load(source, device, quick_gelu=quick_gelu, embed_dim=embed_dim).backbone


def from_checkpoint(ckpt: TrainCheckpoint, device: str = "cpu", source: str | None = None) -> LoadedModel:
    """Rebuild the backbone and the method of a training checkpoint and apply their trained tensors."""
    where = ckpt.where
    model = rebuild_backbone(ckpt)
    # the method first: it installs its adapters into the backbone's blocks, whose trained
    # tensors are then part of the backbone state below
    method = build_method(ckpt.method_name, model, dict(ckpt.method_options), None)
    backbone_state = ckpt.part_state("backbone")
    own = model.state_dict()
    unknown = [k for k in backbone_state if k not in own]
    if unknown:
        raise CheckpointError(f"{where}: tensors not in the model: {unknown[:5]}")
    missing = model.load_state_dict(backbone_state, strict=False).missing_keys
    if ckpt.state_is_full and missing:
        raise CheckpointError(f"{where}: full checkpoint lacks {missing[:5]}")
    bad = method.load_state_dict(ckpt.part_state("method"), strict=False)
    if bad.unexpected_keys or bad.missing_keys:
        raise CheckpointError(f"{where}: method {method.name} state does not match (missing {bad.missing_keys[:5]}, unexpected {bad.unexpected_keys[:5]})")
    src = source or (str(ckpt.path) if ckpt.path is not None else ckpt.backbone_source)
    return LoadedModel(model.to(device).eval(), method.to(device).eval(), str(src), ckpt.method_record)


__all__ = ["LoadedModel", "from_checkpoint", "load", "load_model"]
