"""Training configuration: one dataclass tree, loaded from YAML and overridden from the CLI.

A *method* is a config that picks components (``method.name``); the loop is the same for all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsitr.utils.config import describe_range, from_mapping, in_range
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import read_yaml


@dataclass
class DataConfig:
    path: str = ""  # annotation file or dataset folder
    format: str = "auto"
    image_root: str | None = None
    labels: str | None = None  # None/"auto", a CSV path, "filename", "ucm-order", "none"
    skip_bad: bool = False
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    epoch_unit: str = "pairs"  # "pairs": every (image, caption) once per epoch; "images": one random caption per image
    workers: int = 0  # DataLoader worker processes for image decoding
    subset: int | None = None  # use only the first N images of each split (smoke runs)
    # several datasets as one (instead of path): [{path, name, weight, format, image_root, labels}, ...]
    # train on the union of their train splits, each part's val/test scored on its own (rsitr.data.mixed)
    sources: tuple = ()


@dataclass
class ModelConfig:
    backbone: str = "towers:efficientnet-lite0+minilm-l6"  # a checkpoint path, "towers:NAME" or "clip:CONFIG"
    mode: str = "heads"  # what trains: "full" | "heads" | "locked-image" | "proj" | "frozen" | "top:I,T[+bn]" (two-tower: see rsitr.models.towers.model)
    quick_gelu: bool | None = None  # CLIP activation override for open_clip state dicts
    embed_dim: int = 256  # shared space of the two-tower heads


@dataclass
class AugmentConfig:
    enabled: bool = True
    scale: tuple[float, float] = (0.5, 1.0)  # random resized crop area fraction
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True


@dataclass
class MethodConfig:
    name: str = "baseline"  # "baseline" (symmetric InfoNCE); the method issues add more
    options: dict[str, Any] = field(default_factory=dict)
    # "keep" (the papers): every other pair of the batch is a negative of a matched pair. "mask": a
    # batch caption whose exact sentence (case and spacing aside) is also a caption of another
    # batch image is not a negative of that image; it leaves both softmax denominators of every
    # contrastive loss of the method (UCM: 9,596 of its 10,500 captions recur under other images).
    false_negatives: str = "keep"
    # "single" (the papers): the matched pair is the only positive. "multi": such a same-sentence pair
    # is a positive instead (soft targets spread over the positives of each image and each caption;
    # supersedes "mask" for those pairs). RSICD: 54,605 captions, far fewer distinct sentences.
    positives: str = "single"


@dataclass
class InferenceConfig:
    # no-grad encodes (frozen-trunk caches, the test split after training): "auto" (ONNX Runtime
    # where installed, else torch), "onnx" or "torch"; see rsitr.models.engine
    engine: str = "auto"
    onnx_cache: str | None = None  # where exported graphs go (default: $RSITR_ONNX_CACHE or ~/.cache/rsitr/onnx; keyed by content)


@dataclass
class DistillConfig:
    """Distillation of trained teacher runs into the student (:mod:`rsitr.train.distill`; off
    while ``teachers`` is empty). An added loss term, ``weight * KL(teacher || student)`` of the
    in-batch image->text / text->image softmax rows (TinyCLIP's affinity mimicking,
    :mod:`rsitr.losses.distill`), whatever the method."""

    teachers: tuple = ()  # rsitr run folders (their best, else last checkpoint) or checkpoint files
    weight: float = 1.0  # of the distillation term, added to the method's loss
    temperature: float | None = None  # None: each model's own logit scale (teachers' and student's); a float: 1/tau for all
    directions: str = "both"  # "both" (mean of the two), "i2t" or "t2i"
    average: str = "probs"  # several teachers: "probs" (mean of their distributions) or "logits" (softmax of their mean similarity)
    # sha256 of each teacher's checkpoint file: filled in by the run (config.json, checkpoints) and
    # checked on --resume; given in a config, it pins the teacher files
    sha256: tuple = ()

    def __post_init__(self) -> None:
        # `--set distill.teachers=runs/a` gives one path, not a list
        if isinstance(self.teachers, str):
            self.teachers = (self.teachers,)
        if isinstance(self.sha256, str):
            self.sha256 = (self.sha256,)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    out_dir: str = "runs/default"
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    time_budget: float | None = None  # stop after this many seconds of training (incl. feature caching; summed over resumes); for same-budget comparisons
    batch_size: int = 64  # global batch (split across processes under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is per micro-batch)
    lr: float = 1e-3
    weight_decay: float = 0.2
    trunk_lr_scale: float = 1.0  # learning rate of trainable pretrained trunks (towers' "image"/"text" groups) relative to lr
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    amp: str = "auto"  # "auto" (fp16 on CUDA, off on CPU) | "off" | "bf16" | "fp16"
    seed: int = 0
    eval_every: int = 1  # validate every N epochs (0: never; best = last)
    select_metric: str = "mR"
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0: once per epoch)
    cache_features: str = "auto"  # "auto": cache frozen-trunk outputs when the trunk is frozen; "off"
    cache_dir: str | None = None  # where cached trunk features go (default: <out_dir>/cache); share it across runs of one dataset
    cache_seed: int | None = None  # seed of the cached augmented views (default: the run seed); fix it to share views across seeds
    cache_views: int = 1  # augmented views cached per image when caching (1 = the eval view only)
    eval_batch_size: int = 128
    device: str = "auto"
    log_every: int = 10

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        cfg = from_mapping(cls, d, "config")
        cfg.check_ranges()
        return cfg

    def check_ranges(self) -> None:
        """Refuse values outside their allowed range (one :class:`RsitrError` naming the key and
        the range): ``batch_size=0`` used to end in a ZeroDivisionError, ``lr=-1`` in the
        optimizer's ValueError, ``epochs=-1`` in a "trained" run without a checkpoint."""
        from rsitr.data.types import parse_distinct_filter

        for key in ("train_split", "val_split", "test_split"):
            filt = getattr(self.data, key).partition(":")[2]
            if filt.strip():
                parse_distinct_filter(filt)  # a DataError (an RsitrError) naming the filter
        for key, (lo, hi, lo_open) in RANGES.items():
            node: Any = self
            for part in key.split("."):
                node = getattr(node, part)
            if node is None:
                continue
            values = node if isinstance(node, tuple) else (node,)
            for v in values:
                if not in_range(v, lo, hi, lo_open):  # the one range rule of every config (rsitr.utils.config)
                    raise RsitrError(f"{key}: must be {describe_range(lo, hi, lo_open)}, got {node!r}")
        for key, allowed in choices().items():
            node = self
            for part in key.split("."):
                node = getattr(node, part)
            if node not in allowed:
                raise RsitrError(f"{key}: must be one of {allowed}, got {node!r}")
        from rsitr.methods.base import method_class

        # the method's options: unknown keys, types and declared ranges, before any data is read
        method_class(self.method.name).parse_options(self.method.options)
        d = self.distill
        if any(not isinstance(t, str) or not t for t in d.teachers):
            raise RsitrError(f"distill.teachers: must be a list of run folders or checkpoint files, got {list(d.teachers)!r}")
        if d.sha256 and len(d.sha256) != len(d.teachers):
            raise RsitrError(f"distill.sha256: one digest per teacher, got {len(d.sha256)} for {len(d.teachers)} teachers")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise RsitrError(f"config file not found: {path}")
        raw = read_yaml(path, "training config") or {}
        if not isinstance(raw, dict):
            raise RsitrError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(raw)
        except RsitrError as exc:
            raise RsitrError(f"{path}: {exc}") from exc

    def override(self, dotted: dict[str, Any]) -> "TrainConfig":
        """Return a copy with ``{"model.mode": "full", "lr": 1e-4}``-style overrides applied."""
        d = self.to_dict()
        for key, value in dotted.items():
            node = d
            parts = key.split(".")
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise RsitrError(f"unknown config key: {key}")
                node = node[p]
            if parts[-1] not in node and not (len(parts) > 1 and parts[-2] == "options"):
                raise RsitrError(f"unknown config key: {key}")
            node[parts[-1]] = value
        return TrainConfig.from_dict(d)


# allowed values of the numeric keys: (low, high or None, True: low excluded | "hi_open": high
# excluded | False: both included); None values (unset) pass
RANGES: dict[str, tuple[float, float | None, bool | str]] = {
    "epochs": (1, None, False), "batch_size": (1, None, False), "grad_accum": (1, None, False), "lr": (0, None, True),
    "weight_decay": (0, None, False), "trunk_lr_scale": (0, None, False), "warmup_steps": (0, None, False),
    "min_lr_ratio": (0, 1, False), "betas": (0, 1, "hi_open"), "eps": (0, None, True), "grad_clip": (0, None, True),
    "seed": (0, None, False), "eval_every": (0, None, False), "save_every_steps": (0, None, False),
    "cache_views": (1, None, False), "eval_batch_size": (1, None, False), "log_every": (1, None, False),
    "max_steps": (1, None, False), "time_budget": (0, None, True), "cache_seed": (0, None, False),
    "data.workers": (0, None, False), "data.subset": (1, None, False),
    "augment.hflip": (0, 1, False), "augment.vflip": (0, 1, False), "augment.scale": (0, 1, True),
    "model.embed_dim": (1, None, False),
    "distill.weight": (0, None, True), "distill.temperature": (0, None, True),
}

def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of string keys, from the modules that implement them."""
    from rsitr.losses.distill import AVERAGES, DIRECTIONS

    return {"distill.directions": DIRECTIONS, "distill.average": AVERAGES}


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``lr=1e-4``, ``model.mode=full``)."""
    if "=" not in text:
        raise RsitrError(f"override must look like key=value, got {text!r}")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed
