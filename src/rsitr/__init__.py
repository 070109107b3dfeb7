"""rsitr: remote-sensing image-text retrieval.

The top-level API is lazy: ``import rsitr`` loads nothing else, and the functions below import
their layer when called. The root package sits above every layer (see README "Layout"); no
module of the package imports it (the version lives in :mod:`rsitr.utils.version`).
"""
from __future__ import annotations

from rsitr.utils.version import __version__


def load(path: str, device: str = "cpu"):
    """Load a model: :class:`rsitr.methods.factory.LoadedModel` (``backbone``, ``method``,
    ``preprocess``). ``path`` is anything :func:`load_model` takes; an rsitr training checkpoint
    comes back with the method it was trained with (its scoring), anything else with ``method=None``."""
    from rsitr.methods.factory import load as _load

    return _load(path, device=device)


def load_model(path: str, device: str = "cpu"):
    """Load a backbone.

    ``path`` is an open_clip / OpenAI CLIP checkpoint file (.pt/.bin/.safetensors, state dict or
    TorchScript archive), a Hugging Face CLIP directory (config.json + weights), a two-tower
    name such as ``"towers:efficientnet-lite0+minilm-l6"``, or an rsitr training checkpoint.
    """
    from rsitr.methods.factory import load_model as _load

    return _load(path, device=device)


def tokenize(texts, context_length: int = 77):
    """CLIP BPE tokenization; the same ids as open_clip's tokenizer. Returns LongTensor [B, 77]."""
    from rsitr.models.clip.tokenizer import tokenize as _tok

    return _tok(texts, context_length=context_length)


__all__ = ["__version__", "load", "load_model", "tokenize"]
