"""rsitr's CLIP: model, checkpoint loaders and BPE tokenizer (no open_clip / torchvision).

Importing this package registers the ``clip:CONFIG`` backbone family (random initialisation of a
named config; rebuilds from a stored config) and the builder of specs that are paths (CLIP weights: OpenAI, open_clip, Hugging
Face) with :mod:`rsitr.models.registry`."""
from typing import Iterable

import torch

from rsitr.models.base import Backbone
from rsitr.models.clip.loading import infer_config, load_clip, read_state_dict
from rsitr.models.clip.model import CLIP, CONFIGS, CLIPConfig
from rsitr.models.registry import PATH, register_backbone
from rsitr.utils.errors import RsitrError


def _clip_names() -> Iterable[str]:
    return CONFIGS


def _clip_from_stored_config(config: dict) -> Backbone:
    """The architecture of a CLIP from the config it recorded in its ``BackboneInfo``."""
    return CLIP.from_config(dict(config))


@register_backbone("clip", names=_clip_names, random_init=True, from_config=_clip_from_stored_config)
def _clip_config(name: str, device: str, *, quick_gelu: bool | None = None, seed: int | None = None, **_) -> Backbone:
    """``clip:NAME``: a randomly initialised CLIP of a named config (``seed`` seeds it)."""
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {} if quick_gelu is None else {"quick_gelu": quick_gelu}
    return CLIP.from_config(name, **kwargs)


@register_backbone(PATH)
def _clip_weights(path: str, device: str, *, quick_gelu: bool | None = None, **_) -> Backbone:
    """A spec without a family prefix: CLIP weights at that path."""
    if not path:
        raise RsitrError("empty backbone spec: give towers:NAME, clip:CONFIG or a checkpoint path")
    return load_clip(path, device=device, quick_gelu=quick_gelu)


__all__ = ["CLIP", "CLIPConfig", "CONFIGS", "infer_config", "load_clip", "read_state_dict"]
