"""rsitr: remote-sensing image-text retrieval."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(path: str, device: str = "cpu"):
    """Load a backbone.

    ``path`` is an open_clip / OpenAI CLIP checkpoint file (.pt/.bin/.safetensors, state dict or
    TorchScript archive), a Hugging Face CLIP directory (config.json + weights), a two-tower
    name such as ``"towers:efficientnet-lite0+minilm-l6"``, or an rsitr training checkpoint.
    """
    from rsitr.models.registry import load_model as _load

    return _load(path, device=device)


def tokenize(texts, context_length: int = 77):
    """CLIP BPE tokenization; the same ids as open_clip's tokenizer. Returns LongTensor [B, 77]."""
    from rsitr.models.clip.tokenizer import tokenize as _tok

    return _tok(texts, context_length=context_length)


__all__ = ["__version__", "load_model", "tokenize"]
