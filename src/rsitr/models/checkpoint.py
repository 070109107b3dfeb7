"""Training checkpoints: plain tensors and python values only (loadable with
``torch.load(weights_only=True)``), written atomically.

Layout of a checkpoint dict::

    {"rsitr": {"version": ..., "kind": "train-checkpoint"},
     "backbone": {"source": "towers:...", "info": {...}},   # how to rebuild the backbone
     "config": {...},                                       # TrainConfig.to_dict()
     "state": {name: tensor}, "state_is_full": bool,        # what was trained (or everything)
     "method": {"name": ..., "options": {...}},
     "optimizer"/"scheduler"/"scaler"/"rng"/"progress"/"best"/"history": resume state (last.pt only)}
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.utils.version import __version__
from rsitr.utils.errors import CheckpointError
from rsitr.utils.io import atomic_path
from rsitr.utils.weights import load_torch_file

log = logging.getLogger(__name__)

KIND = "train-checkpoint"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": _np_state(),
        "python": list(_tuplify_to_list(random.getstate())),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(state["numpy"]["state"]["key"], dtype=np.uint32), "pos": int(state["numpy"]["state"]["pos"])}
    np.random.set_state(np_state)
    random.setstate(_listify_to_tuple(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _np_state() -> dict[str, Any]:
    st = np.random.get_state(legacy=False)
    # numpy arrays are not allowed by weights_only loading: store the key as a tensor
    st["state"] = {"key": torch.from_numpy(st["state"]["key"].astype(np.int64)), "pos": int(st["state"]["pos"])}
    return st


def _tuplify_to_list(x):
    return [_tuplify_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _listify_to_tuple(x):
    return tuple(_listify_to_tuple(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"rsitr": {"version": __version__, "kind": KIND}, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _is_torchscript(path: Path) -> bool:
    """torch.load would hand a TorchScript archive to torch.jit.load (which runs its code):
    such files are never opened with torch.load here."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def is_rsitr_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / "checkpoint_best.pt").is_file() or (path / "checkpoint_last.pt").is_file()
    if not path.is_file() or path.suffix == ".safetensors" or _is_torchscript(path):
        return False
    try:
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours (TorchScript archive, garbage...): the caller tries other loaders
        return False
    return isinstance(d, dict) and isinstance(d.get("rsitr"), dict) and d["rsitr"].get("kind") == KIND


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an rsitr checkpoint file, or the best (else last) checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: no checkpoint_best.pt or checkpoint_last.pt in this run directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript archive, not an rsitr training checkpoint")
    d = load_torch_file(path, what="rsitr checkpoint")
    if not (isinstance(d, dict) and isinstance(d.get("rsitr"), dict) and d["rsitr"].get("kind") == KIND):
        raise CheckpointError(f"{path}: not an rsitr training checkpoint")
    d["_path"] = str(path)
    return d
