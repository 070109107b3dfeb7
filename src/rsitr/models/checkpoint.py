"""Training checkpoints: the :class:`TrainCheckpoint` owner type -- the only writer and the only
reader of ``checkpoint_best.pt`` / ``checkpoint_last.pt``.

A checkpoint holds plain tensors and python values only (loadable with
``torch.load(weights_only=True)``: a checkpoint is untrusted input) and is written atomically
(temporary name, then rename). On disk it is one dict::

    {"rsitr": {"version": <package>, "kind": "train-checkpoint", "schema": SCHEMA},
     "backbone": {"source": "towers:...", "info": {...}},   # how to rebuild the backbone
     "config": {...},                                       # TrainConfig.to_dict()
     "state": {name: tensor}, "state_is_full": bool,        # what was trained (or everything)
     "method": {"name": ..., "options": {...}},
     "best"/"history"/"epoch_order"/"progress": where the run stands,
     "optimizer"/"scheduler"/"scaler"/"rng": resume state (last.pt only)}

Schema versions: 0 is the layout before ``rsitr.schema`` existed (no such key; identical keys
otherwise), migrated on load; 1 adds the key. A file of a newer schema than this code reads is
refused, as is a file whose entries have the wrong types -- one line naming the file and the entry.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.utils.errors import CheckpointError
from rsitr.utils.io import atomic_path
from rsitr.utils.version import __version__
from rsitr.utils.weights import load_torch_file

log = logging.getLogger(__name__)

KIND = "train-checkpoint"
SCHEMA = 1  # the on-disk layout this code writes (see the module doc)
RUN_FILES = ("checkpoint_best.pt", "checkpoint_last.pt")  # what a run folder resolves to, in order
_RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng")


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


@dataclass
class ResumeState:
    """What ``checkpoint_last.pt`` adds to continue a run exactly: optimizer, scheduler and
    grad-scaler states and the RNG states (:func:`rng_state`)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]


@dataclass
class TrainCheckpoint:
    """One training checkpoint: how to rebuild the backbone (``backbone_source`` /
    ``backbone_info``), the run's config (``TrainConfig.to_dict()``), the trained tensors
    (``state``, keys ``backbone.*`` / ``method.*``; the whole backbone when ``state_is_full``), the
    method (``method_name`` / ``method_options``), where the run stands (``best``, ``history``,
    ``progress``, ``epoch_order``) and, in ``checkpoint_last.pt``, ``resume``. ``path`` is where it
    was read from (None for one made in memory); ``schema`` the layout version it was read in."""

    backbone_source: str
    backbone_info: dict[str, Any]
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    state_is_full: bool
    method_name: str
    method_options: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    epoch_order: torch.Tensor | None = None
    resume: ResumeState | None = None
    path: Path | None = None
    schema: int = SCHEMA
    version: str = __version__  # the rsitr version that wrote it

    # -- what the readers need ------------------------------------------------------------------
    @property
    def where(self) -> str:
        """How error messages name this checkpoint."""
        return str(self.path) if self.path is not None else "checkpoint"

    @property
    def method_record(self) -> dict[str, Any]:
        """``{"name", "options"}``: what the method is rebuilt from."""
        return {"name": self.method_name, "options": dict(self.method_options)}

    def part_state(self, part: str) -> dict[str, torch.Tensor]:
        """The trained tensors of ``part`` (``"backbone"`` or ``"method"``), keys without the prefix."""
        prefix = f"{part}."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}

    @property
    def model_config(self) -> dict[str, Any]:
        """The run's ``model`` config section (mode, quick_gelu, embed_dim...)."""
        return dict(self.config.get("model") or {})

    @property
    def global_step(self) -> int:
        return int(self.progress.get("global_step", 0))

    # -- writing --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (see the module doc)."""
        d: dict[str, Any] = {
            "rsitr": {"version": __version__, "kind": KIND, "schema": SCHEMA},
            "backbone": {"source": self.backbone_source, "info": self.backbone_info},
            "config": self.config,
            "state": self.state,
            "state_is_full": bool(self.state_is_full),
            "method": {"name": self.method_name, "options": self.method_options},
            "best": self.best,
            "history": self.history,
            "epoch_order": self.epoch_order,
            "progress": self.progress,
        }
        if self.resume is not None:
            d.update(optimizer=self.resume.optimizer, scheduler=self.resume.scheduler, scaler=self.resume.scaler, rng=self.resume.rng)
        return d

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)

    # -- reading --------------------------------------------------------------------------------
    @staticmethod
    def resolve(path: str | Path) -> Path:
        """The checkpoint file of ``path``: itself, or a run folder's best (else last) checkpoint."""
        path = Path(path)
        if path.is_dir():
            for name in RUN_FILES:
                if (path / name).is_file():
                    return path / name
            raise CheckpointError(f"{path}: no checkpoint_best.pt or checkpoint_last.pt in this run directory")
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainCheckpoint":
        """Read, validate and (for older schemas) migrate the checkpoint of ``path`` (a file or a
        run folder), opening the file once. Anything wrong is one :class:`CheckpointError` line."""
        path = cls.resolve(path)
        if _is_torchscript(path):
            raise CheckpointError(f"{path}: a TorchScript archive, not an rsitr training checkpoint")
        d = load_torch_file(path, what="rsitr checkpoint")
        if not _has_header(d):
            raise CheckpointError(f"{path}: not an rsitr training checkpoint")
        return cls.from_dict(d, path)

    @classmethod
    def probe(cls, path: str | Path) -> "TrainCheckpoint | None":
        """The checkpoint at ``path`` when it is one (a run folder, or a file with the rsitr
        header), read in the same single open; None when it is some other file (a CLIP weights
        file, TorchScript, garbage: the caller's other loaders report on it). A file with the
        header that fails validation raises."""
        path = Path(path)
        if path.is_dir():
            return cls.load(path) if any((path / n).is_file() for n in RUN_FILES) else None
        if not path.is_file() or path.suffix == ".safetensors" or _is_torchscript(path):
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not ours (TorchScript archive, garbage...): the caller tries other loaders
            return None
        return cls.from_dict(d, path) if _has_header(d) else None

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path | None = None) -> "TrainCheckpoint":
        """Validate an on-disk dict (any schema up to :data:`SCHEMA`) and build the checkpoint."""
        where = str(path) if path is not None else "checkpoint"
        if not _has_header(d):
            raise CheckpointError(f"{where}: not an rsitr training checkpoint")
        head = d["rsitr"]
        schema = head.get("schema", 0)  # 0: written before the schema key existed (same layout)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 0:
            raise CheckpointError(f"{where}: rsitr.schema must be a non-negative integer, got {schema!r}")
        if schema > SCHEMA:
            raise CheckpointError(f"{where}: written by a newer rsitr ({head.get('version')}, checkpoint schema {schema}); "
                                  f"this version reads schemas up to {SCHEMA}")
        backbone = _entry(d, "backbone", dict, where)
        method = _entry(d, "method", dict, where)
        state = _entry(d, "state", dict, where)
        bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        if bad:
            raise CheckpointError(f"{where}: 'state' must map names to tensors; {bad[:3]} do not")
        resume = None
        if all(d.get(k) is not None for k in _RESUME_KEYS):
            resume = ResumeState(*(_entry(d, k, dict, where) for k in _RESUME_KEYS))
        order = d.get("epoch_order")
        if order is not None and not isinstance(order, torch.Tensor):
            raise CheckpointError(f"{where}: 'epoch_order' must be a tensor or None, got {type(order).__name__}")
        return cls(
            backbone_source=_entry(backbone, "source", str, where, "backbone.source"),
            backbone_info=_entry(backbone, "info", dict, where, "backbone.info"),
            config=_entry(d, "config", dict, where),
            state=state,
            state_is_full=_entry(d, "state_is_full", bool, where),
            method_name=_entry(method, "name", str, where, "method.name"),
            method_options=dict(_entry(method, "options", dict, where, "method.options", default={})),
            best=_entry(d, "best", dict, where, default={}),
            history=_entry(d, "history", list, where, default=[]),
            progress=_entry(d, "progress", dict, where, default={}),
            epoch_order=order,
            resume=resume,
            path=Path(path) if path is not None else None,
            schema=SCHEMA,  # migrated: schema 0 has the same keys
            version=str(head.get("version", "")),
        )


_MISSING = object()


def _entry(d: dict[str, Any], key: str, typ: type, where: str, name: str | None = None, default: Any = _MISSING) -> Any:
    """``d[key]`` checked to be a ``typ`` (``default`` when absent or None and one is given)."""
    v = d.get(key)
    if v is None and default is not _MISSING:
        return default
    if v is None:
        raise CheckpointError(f"{where}: checkpoint entry '{name or key}' is missing")
    if not isinstance(v, typ):
        raise CheckpointError(f"{where}: checkpoint entry '{name or key}' must be a {typ.__name__}, got {type(v).__name__}")
    return v


def _has_header(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("rsitr"), dict) and d["rsitr"].get("kind") == KIND


def _is_torchscript(path: Path) -> bool:
    """torch.load would hand a TorchScript archive to torch.jit.load (which runs its code):
    such files are never opened with torch.load here."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


__all__ = ["KIND", "RUN_FILES", "SCHEMA", "ResumeState", "TrainCheckpoint", "rng_state", "set_rng_state"]
