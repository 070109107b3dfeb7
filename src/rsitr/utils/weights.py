"""Reading tensor files that are untrusted input: ``torch.load(weights_only=True)`` and safetensors.

Both raise one :class:`CheckpointError` with a one-line message naming the file when the file
cannot be read. PyTorch's own message for a refused pickle advises re-running with
``weights_only=False``, which would run whatever code the file carries; that advice is never
passed on (DESIGN.md: a checkpoint is untrusted input).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rsitr.utils.errors import CheckpointError


def _reason(exc: BaseException) -> str:
    """A short, safe description of why ``torch.load``/safetensors refused a file."""
    text = str(exc)
    name = type(exc).__name__
    if "Weights only load failed" in text or name == "UnpicklingError":
        m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
        detail = " ".join(m.group(1).split()) if m else ""
        # its first sentence only: what follows is PyTorch's advice on how to allow the object
        # (add_safe_globals / weights_only=False), which is not advice for an untrusted file
        detail = re.split(r"(?<=[a-z0-9])\. ", detail)[0].rstrip(".")
        if any(w in detail for w in ("weights_only", "safe_globals", "Please use")):
            detail = ""
        detail = f": {detail[:120]}" if detail else ""
        return f"not a weights-only tensor file, or corrupt (the pickle holds something other than tensors and plain values{detail})"
    if "zip archive" in text or "PytorchStreamReader" in text or "central directory" in text:
        return "corrupt or truncated (not a readable PyTorch zip archive)"
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "truncated (the file ends early)"
    if name == "SafetensorError" or "deserializing header" in text:
        first = text.strip().splitlines()[0] if text.strip() else name
        return f"not a valid safetensors file ({first[:160]})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first:
        first = ""
    return f"unreadable ({name}{': ' + first[:160] if first else ''})"


def load_torch_file(path: str | Path, *, what: str = "checkpoint", **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file that cannot be read is a
    one-line :class:`CheckpointError` naming it."""
    import torch

    path = Path(path)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(str(path), weights_only=True, **kwargs)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: {what} not found") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path}: a directory, not a {what} file") from exc
    except MemoryError as exc:
        raise CheckpointError(f"{path}: {what} is corrupt (it asks for more memory than there is)") from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path}: cannot read this {what}: {_reason(exc)}") from exc


def load_safetensors(path: str | Path, *, what: str = "safetensors file") -> dict:
    """``safetensors.torch.load_file``; an unreadable file is a one-line :class:`CheckpointError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return load_file(str(path))
    except MemoryError as exc:
        raise CheckpointError(f"{path}: {what} is corrupt (it asks for more memory than there is)") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read this {what}: {_reason(exc)}") from exc


def digest_state(h, module, prefix: str) -> None:
    """Feed every tensor of ``module.state_dict()`` (sorted by name: ``prefix.name``, dtype, numel,
    raw bytes) into the hashlib object ``h``: the one definition of "these weights" that index
    manifests (``state_sha256``) and the ONNX graph cache key share."""
    import torch

    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
