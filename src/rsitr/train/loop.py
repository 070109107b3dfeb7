"""The one training loop (single process, or torchrun/DDP). Methods plug in via
:mod:`rsitr.methods.base`; nothing here is method-specific.

:func:`train` runs its pieces in order: :func:`setup` (data, model, caches, optimizer, resumed
state, held by a :class:`Run`), then per epoch :func:`run_epoch` (one :func:`train_step` per
optimizer step) and :func:`validate_and_checkpoint`, and :func:`finish` (test metrics, result.json).

Resume is exact: the epoch order and every augmentation depend only on (seed, epoch,
position), and the checkpoint holds the optimizer, scheduler, scaler and RNG states, so a run
killed after step k and resumed ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rsitr.data.imagesets import ImageSet, TrunkCache, make_transforms, select
from rsitr.models.trunk_cache import build_trunk_cache, supports_trunk_cache
from rsitr.data.types import CaptionDataset
from rsitr.eval.evaluate import encode_dataset, evaluate
from rsitr.methods import factory
from rsitr.methods.base import Method, TrainContext, build_method
from rsitr.models import checkpoint as ckpt
from rsitr.models.base import Backbone, Features
from rsitr.models.registry import parse_spec
from rsitr.train.config import TrainConfig
from rsitr.train.data import load_training_data
from rsitr.train.distill import Teachers, build_teachers, pin_teachers
from rsitr.train.epochs import epoch_order, steps_per_epoch
from rsitr.utils.distributed import DistInfo, barrier, broadcast_object, cleanup, gather_with_grad, init_distributed, resolve_device
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_write_json, atomic_write_text, jsonable
from rsitr.utils.progress import progress_bar

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainStep(nn.Module):
    """Backbone + method as one module, so DDP sees every trainable parameter. ``distill`` (set
    after the trunk caches exist): the teachers whose term is added to the method's loss."""

    def __init__(self, backbone: Backbone, method: Method, dist_info: DistInfo):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.dist_info = dist_info
        self.distill: Teachers | None = None

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        bb = self.backbone
        img = bb.image_head(batch["image_trunk"]) if "image_trunk" in batch else bb.image_features(batch["pixels"])
        txt = bb.text_head(batch["text_trunk"]) if "text_trunk" in batch else bb.text_features(batch["ids"])
        if self.dist_info.enabled:
            img = _gather_features(img, self.dist_info, self.method.needs_tokens)
            txt = _gather_features(txt, self.dist_info, self.method.needs_tokens)
        loss, logs = self.method.loss(bb, img, txt, batch)
        if self.distill is not None:
            term = self.distill.loss(img.pooled, txt.pooled, self.method.temperature(bb), batch)
            loss = loss + self.distill.weight * term
            logs = {**logs, "task": logs.get("loss", float("nan")), "distill": float(term.detach()), "loss": float(loss.detach())}
        return loss, logs


def _gather_features(f: Features, info: DistInfo, tokens: bool) -> Features:
    pooled = gather_with_grad(f.pooled, info)
    if not tokens:
        return Features(pooled, f.tokens, f.mask)
    return Features(pooled, gather_with_grad(f.tokens, info), gather_with_grad(f.mask, info))


def _set_trainable(module: TrainStep, mode: str) -> None:
    module.backbone.apply_mode(mode)  # also where the trunks end (what the frozen-trunk cache holds)
    # method modules always train (their own parameters)
    for p in module.method.parameters():
        p.requires_grad_(True)


def _param_groups(module: nn.Module, weight_decay: float, lr: float, trunk_ids: set[int] | None = None, trunk_lr_scale: float = 1.0) -> list[dict]:
    """No weight decay on gains, biases, embeddings-like 1-D tensors and the temperature
    (open_clip's exclusion rule); pretrained trunk parameters (``trunk_ids``) at
    ``lr * trunk_lr_scale``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(d, t): [] for d in (True, False) for t in (False, True)}
    trunk_ids = trunk_ids or set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name or "bias" in name or "embedding" in name
        groups[(not no_decay, id(p) in trunk_ids)].append(p)
    return [{"params": ps, "weight_decay": weight_decay if d else 0.0, "lr": lr * (trunk_lr_scale if t else 1.0)}
            for (d, t), ps in groups.items()]


def cosine_with_warmup(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _autocast(amp: str, device: torch.device):
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext(), None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type) if (amp == "fp16" and device.type == "cuda") else None
    return torch.autocast(device_type=device.type, dtype=dtype), scaler


def trainable_state(module: TrainStep, full_backbone: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: every trained tensor (and the whole backbone when it cannot
    be rebuilt from its source, e.g. randomly initialised or fully fine-tuned)."""
    out: dict[str, torch.Tensor] = {}
    if full_backbone:
        for k, v in module.backbone.state_dict().items():
            out[f"backbone.{k}"] = v.detach().cpu().clone()
    else:
        for k, p in module.backbone.named_parameters():
            if p.requires_grad:
                out[f"backbone.{k}"] = p.detach().cpu().clone()
        # and the buffers of modules that train (batch-norm running statistics of trained blocks)
        for name, m in module.backbone.named_modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                for k, b in m.named_buffers(prefix=name, recurse=False):
                    if k.rsplit(".", 1)[-1] not in m._non_persistent_buffers_set:
                        out[f"backbone.{k}"] = b.detach().cpu().clone()
    for k, v in module.method.state_dict().items():
        out[f"method.{k}"] = v.detach().cpu().clone()
    return out


def load_trainable_state(module: TrainStep, state: dict[str, torch.Tensor], where: str) -> None:
    # shared tensors (tied weights, a teacher aliasing a student) are reachable under every name
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(dict(module.named_buffers(remove_duplicate=False)))
    bad = [k for k in state if k not in own]
    if bad:
        raise RsitrError(f"{where}: checkpoint has tensors this model does not ({bad[:5]}...)")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise RsitrError(f"{where}: shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
            own[k].copy_(v)


@dataclass
class TrainResult:
    out_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] | None = None
    seconds: float = 0.0  # this invocation
    run_seconds: float = 0.0  # the whole run: earlier invocations of a resumed run included (as of their last checkpoint)
    trainable_params: int = 0
    total_params: int = 0
    steps: int = 0  # optimizer steps done (over all invocations of a resumed run)
    planned_steps: int = 0  # what epochs / max_steps asked for
    budget_stopped: bool = False  # time_budget ended the run before planned_steps
    steps_per_epoch: int = 0

    @property
    def undertrained(self) -> bool:
        """True when time_budget stopped training before one epoch was complete: the model is not
        a trained model, whatever its metrics say."""
        return self.budget_stopped and self.steps < self.steps_per_epoch


@dataclass
class Run:
    """One training run between its pieces (:func:`setup`, :func:`run_epoch`,
    :func:`validate_and_checkpoint`, :func:`finish`): what :func:`setup` builds, and the progress
    ``checkpoint_last.pt`` holds (epoch, step, best, history)."""

    cfg: TrainConfig
    progress: bool
    t_start: float  # time.perf_counter() when train() started
    elapsed_before: float  # seconds of earlier invocations of a resumed run (time_budget)
    dist_info: DistInfo
    device: torch.device
    out: Path
    data: CaptionDataset
    train_ds: CaptionDataset
    val_ds: CaptionDataset
    backbone: Backbone
    method: Method
    module: TrainStep
    ddp_module: nn.Module  # module, wrapped by DistributedDataParallel under torchrun
    n_train: int
    n_total: int
    full_backbone: bool  # checkpoints hold the whole backbone
    cache: TrunkCache | None
    val_cache: TrunkCache | None
    images: ImageSet | None  # pixels of the training images when the cache has no image trunk
    offsets: np.ndarray  # text index of each image's first caption
    all_texts: list[str]
    labels_all: torch.Tensor | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: Any
    scaler: Any
    spe: int  # optimizer steps per epoch
    total_steps: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    saved_order: np.ndarray | None = None  # the running epoch's pairs when a method changed them (resumed mid-epoch)
    order_now: np.ndarray | None = None  # this epoch's pairs when the method changed them (checkpointed)
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    budget_stopped: bool = False
    ctx: TrainContext = field(init=False)  # what Method.epoch_pairs may use; its encode() is the run's

    def __post_init__(self) -> None:
        self.ctx = TrainContext(backbone=self.backbone, train_data=self.train_ds, encode=self.encode_train, out_dir=self.out)

    @property
    def views(self) -> int:
        """Augmented views of the training images in the trunk cache (1: none cached)."""
        return len(self.cache.image) if self.cache is not None and self.cache.image else 1

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoint_last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "checkpoint_best.pt"

    def elapsed(self) -> float:
        """Seconds of the whole run, earlier invocations included (time_budget, checkpoints)."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def encode_train(self) -> tuple[Features, Features]:
        """Every training image and caption with the current weights (``TrainContext.encode``)."""
        cache, cfg = self.cache, self.cfg
        eval_cache = TrunkCache([cache.image[0]] if cache.image else None, cache.text) if cache is not None else None
        enc = encode_dataset(self.backbone, self.train_ds, trunk_cache=eval_cache, keep_tokens=True, batch_size=cfg.eval_batch_size,
                             workers=cfg.data.workers, device=self.device, progress=self.progress and self.dist_info.is_main)
        return enc.image_features, enc.text_features

    def save(self, path: Path, with_resume_state: bool) -> None:
        if not self.dist_info.is_main:
            return
        cfg = self.cfg
        resume = None
        if with_resume_state:
            resume = ckpt.ResumeState(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                                      scaler=self.scaler.state_dict() if self.scaler is not None else {}, rng=ckpt.rng_state())
        ckpt.TrainCheckpoint(
            backbone_source=cfg.model.backbone, backbone_info=_info_dict(self.backbone), config=cfg.to_dict(),
            state=trainable_state(self.module, self.full_backbone), state_is_full=self.full_backbone,
            method_name=self.method.name, method_options=jsonable(self.method.options), best=self.best, history=self.history,
            epoch_order=torch.from_numpy(self.order_now) if self.order_now is not None else None,
            progress={"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "seconds": self.elapsed()},
            resume=resume,
        ).save(path)


def _inference_engine(backbone: Backbone, cfg: TrainConfig):
    """The no-grad engine (ONNX Runtime / torch) for the trunk caches and the test split: the
    trunks' graphs with the heads in torch (``whole=False``), since the trained weights change
    with every run and one test evaluation does not repay exporting the whole model."""
    from rsitr.models.engine import engine_for

    return engine_for(backbone, cfg.inference.engine, cache_dir=cfg.inference.onnx_cache, whole=False)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    evaluate_test: bool = True,
) -> TrainResult:
    """Train ``cfg`` and return the best validation metrics (and test metrics of the best
    checkpoint). ``on_step(global_step)`` is called after every optimizer step (tests use it
    to simulate a crash)."""
    run = setup(cfg, resume=resume, progress=progress)
    while run.epoch < cfg.epochs and not run.done:
        record = run_epoch(run, on_step)
        validate_and_checkpoint(run, record)
    return finish(run, evaluate_test=evaluate_test)


# -- set-up -------------------------------------------------------------------------------------
def setup(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> Run:
    """Everything a run needs before its first step: the output folder, data, backbone and method,
    trunk caches, optimizer and schedule, and with ``resume`` the state of ``checkpoint_last.pt``."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    out = Path(cfg.out_dir)
    last_path = out / "checkpoint_last.pt"
    prior = ckpt.TrainCheckpoint.load(last_path) if resume and last_path.exists() else None
    # the teachers' files pinned by their sha256 (config.json, checkpoints); a resumed run keeps them
    cfg = pin_teachers(cfg, prior.config if prior is not None else None)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and last_path.exists():
            raise RsitrError(f"{out} already holds a run (checkpoint_last.pt); pass --resume to continue it or choose another --out")
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    barrier(dist_info)

    seed_everything(cfg.seed)
    data = load_training_data(cfg.data)
    train_ds, val_ds = data.split(cfg.data.train_split), data.split(cfg.data.val_split)
    if len(train_ds) == 0:
        raise RsitrError(f"{cfg.data.path or 'data.sources'}: the '{cfg.data.train_split}' split is empty")
    backbone, method, module = _build_model(cfg, train_ds, device, dist_info)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in module.parameters())
    if n_train == 0:
        raise RsitrError(f"model.mode={cfg.model.mode!r} leaves nothing to train")
    full_backbone = cfg.model.mode == "full" or parse_spec(cfg.model.backbone).random_init
    # printed with the progress output (not only logged): what a method trains is part of its result
    msg = (f"{cfg.method.name} on {backbone.info.name} (mode {cfg.model.mode}): {n_train:,} trainable of {n_total:,} parameters "
           f"({100.0 * n_train / n_total:.2f}%)")
    if dist_info.is_main and progress:
        print(msg, flush=True)
    else:
        log.info(msg)

    eval_tf, train_tf = make_transforms(backbone, cfg.augment)
    elapsed_before = float(prior.progress.get("seconds", 0.0)) if prior is not None else 0.0  # earlier invocations, for time_budget
    cache, val_cache = _build_caches(cfg, backbone, method, train_ds, val_ds, out, device, progress and dist_info.is_main, eval_tf, train_tf,
                                     deadline=t_start + cfg.time_budget - elapsed_before if cfg.time_budget is not None else None)
    images = ImageSet(train_ds, train_tf or eval_tf, train=train_tf is not None) if cache is None or cache.image is None else None
    # each teacher once over the trunk cache, its pass stored beside the cache for resumes and other seeds
    module.distill = build_teachers(cfg, backbone, cache, device, _cache_dir(cfg, out))
    label_ids = train_ds.label_indices()  # -1: no scene label (skipped by losses that use labels)

    ddp_module: nn.Module = module
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    trunk_ids = {id(p) for g, ps in backbone.trainable_groups(cfg.model.mode).items() if g in ("image", "text") for p in ps}
    optimizer = torch.optim.AdamW(_param_groups(module, cfg.weight_decay, cfg.lr, trunk_ids, cfg.trunk_lr_scale), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    n_pairs = sum(len(e.captions) for e in train_ds.entries) if cfg.data.epoch_unit == "pairs" else len(train_ds)
    spe = steps_per_epoch(n_pairs, cfg.batch_size, cfg.grad_accum)
    if spe == 0:
        raise RsitrError(f"batch_size*grad_accum={cfg.batch_size * cfg.grad_accum} is larger than the {n_pairs} training pairs")
    total_steps = spe * cfg.epochs if cfg.max_steps is None else min(spe * cfg.epochs, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, cfg.warmup_steps, cfg.min_lr_ratio))
    autocast, scaler = _autocast(cfg.amp, device)

    run = Run(
        cfg=cfg, progress=progress, t_start=t_start, elapsed_before=elapsed_before, dist_info=dist_info, device=device, out=out,
        data=data, train_ds=train_ds, val_ds=val_ds, backbone=backbone, method=method, module=module, ddp_module=ddp_module,
        n_train=n_train, n_total=n_total, full_backbone=full_backbone, cache=cache, val_cache=val_cache, images=images,
        offsets=np.cumsum([0] + [len(e.captions) for e in train_ds.entries]), all_texts=train_ds.texts()[0],
        labels_all=torch.tensor(label_ids) if label_ids is not None else None,
        optimizer=optimizer, scheduler=scheduler, autocast=autocast, scaler=scaler, spe=spe, total_steps=total_steps,
        best={"epoch": -1, cfg.select_metric: -1.0},
    )
    if prior is not None:
        _restore(run, prior)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting fresh", out)
    run.done = run.global_step >= total_steps
    return run


def _build_model(cfg: TrainConfig, train_ds: CaptionDataset, device: torch.device, dist_info: DistInfo) -> tuple[Backbone, Method, TrainStep]:
    """Backbone and method as one :class:`TrainStep`, with the parameters ``model.mode`` trains."""
    backbone = factory.load_model(cfg.model.backbone, device=str(device), quick_gelu=cfg.model.quick_gelu, embed_dim=cfg.model.embed_dim)
    method = build_method(cfg.method.name, backbone, cfg.method.options, train_ds)
    if cfg.method.false_negatives not in ("keep", "mask"):
        raise RsitrError(f"method.false_negatives must be 'keep' or 'mask', got {cfg.method.false_negatives!r}")
    method.set_positives(cfg.method.positives)
    if cfg.method.false_negatives == "mask" or cfg.method.positives == "multi":
        method.mask_false_negatives(train_ds)  # the sentence table both read
    module = TrainStep(backbone, method, dist_info).to(device)
    _set_trainable(module, cfg.model.mode)
    return backbone, method, module


def _cache_dir(cfg: TrainConfig, out: Path) -> Path:
    """Where the run's trunk caches (and stored teacher passes) go: ``cache_dir``, else ``<out>/cache``."""
    return Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"


def _build_caches(cfg: TrainConfig, backbone: Backbone, method: Method, train_ds: CaptionDataset, val_ds: CaptionDataset, out: Path,
                  device: torch.device, show: bool, eval_tf, train_tf, deadline: float | None) -> tuple[TrunkCache | None, TrunkCache | None]:
    """The frozen-trunk caches of the training split (``cache_views`` augmented views) and the
    validation split, when the backbone and method allow them; ``deadline`` (time_budget) covers
    the caching too."""
    if not (cfg.cache_features != "off" and supports_trunk_cache(backbone) and method.capabilities.trunk_cache):
        return None, None
    budget = None
    if deadline is not None:
        from rsitr.data.imagesets import CacheBudget

        # the budget covers the whole run: caching the trunks must leave time to train
        budget = CacheBudget(deadline, cfg.time_budget, what="time_budget")
    cache_dir = _cache_dir(cfg, out)
    engine = _inference_engine(backbone, cfg)
    cache = build_trunk_cache(
        backbone, train_ds, cache_dir=cache_dir, views=cfg.cache_views, train_transform=train_tf, eval_transform=eval_tf,
        keep_tokens=method.needs_tokens, batch_size=cfg.eval_batch_size, workers=cfg.data.workers, seed=cfg.seed if cfg.cache_seed is None else cfg.cache_seed, device=device,
        progress=show, engine=engine, budget=budget,
    )
    val_cache = None
    if len(val_ds):
        val_cache = build_trunk_cache(
            backbone, val_ds, cache_dir=cache_dir, views=1, eval_transform=eval_tf, keep_tokens=method.rerank_needs_tokens or method.needs_tokens,
            batch_size=cfg.eval_batch_size, workers=cfg.data.workers, seed=cfg.seed, device=device, progress=show,
            engine=engine, budget=budget,
        )
    return cache, val_cache


def _restore(run: Run, prior: ckpt.TrainCheckpoint) -> None:
    """Continue exactly where ``checkpoint_last.pt`` stopped (mid-epoch too)."""
    if prior.resume is None:
        raise RsitrError(f"{prior.where}: holds no optimizer/scheduler/RNG state to resume from (a best checkpoint?)")
    load_trainable_state(run.module, prior.state, str(run.last_path))
    run.optimizer.load_state_dict(prior.resume.optimizer)
    run.scheduler.load_state_dict(prior.resume.scheduler)
    if run.scaler is not None and prior.resume.scaler:
        run.scaler.load_state_dict(prior.resume.scaler)
    ckpt.set_rng_state(prior.resume.rng)
    run.epoch, run.step_in_epoch, run.global_step = (prior.progress[k] for k in ("epoch", "step_in_epoch", "global_step"))
    if prior.epoch_order is not None and run.step_in_epoch > 0:
        run.saved_order = prior.epoch_order.numpy()
    run.best, run.history = prior.best, prior.history
    log.info("resumed %s at epoch %d step %d (global step %d)", run.last_path, run.epoch, run.step_in_epoch, run.global_step)


# -- step ---------------------------------------------------------------------------------------
def _batch(run: Run, pairs: np.ndarray, pos: np.ndarray, view_of: np.ndarray, aug_seed: np.ndarray) -> dict[str, Any]:
    """The micro-batch of training ``pairs`` (rows ``pos`` of the epoch order): indices, labels,
    cached trunk features of their drawn view or augmented pixels, and cached text trunks or ids."""
    device, cache = run.device, run.cache
    img_idx = torch.as_tensor(pairs[:, 0])
    txt_idx = torch.as_tensor(run.offsets[pairs[:, 0]] + pairs[:, 1])
    batch: dict[str, Any] = {"image_index": img_idx.to(device), "text_index": txt_idx.to(device), "epoch": run.epoch}
    if run.labels_all is not None:
        batch["labels"] = run.labels_all[img_idx].to(device)
    if cache is not None and cache.image is not None:
        vsel = view_of[pos]
        batch["image_view"] = torch.as_tensor(vsel if run.views > 1 else np.zeros(len(pos), dtype=np.int64)).to(device)
        if run.views == 1:
            batch["image_trunk"] = select(cache.image[0], img_idx, device)
        else:
            parts = [select(cache.image[int(v)], img_idx[i : i + 1], device) for i, v in enumerate(vsel)]
            batch["image_trunk"] = Features(*(torch.cat([getattr(p, a) for p in parts]) for a in ("pooled", "tokens", "mask")))
    else:
        batch["pixels"] = torch.stack([run.images[(int(i), int(s))] for i, s in zip(pairs[:, 0], aug_seed[pos])]).to(device)
    if cache is not None and cache.text is not None:
        batch["text_trunk"] = select(cache.text, txt_idx, device)
    else:
        batch["ids"] = run.backbone.tokenize([run.all_texts[int(j)] for j in txt_idx]).to(device)
    return batch


def train_step(run: Run, order: np.ndarray, view_of: np.ndarray, aug_seed: np.ndarray) -> dict[str, float]:
    """One optimizer step (``grad_accum`` micro-batches) at ``run.step_in_epoch`` of the epoch
    ``order``; advances the step counters and returns the method's logged values."""
    cfg, dist_info, optimizer, scaler = run.cfg, run.dist_info, run.optimizer, run.scaler
    micro = cfg.batch_size
    optimizer.zero_grad(set_to_none=True)
    logs: dict[str, float] = {}
    for m in range(cfg.grad_accum):
        start = (run.step_in_epoch * cfg.grad_accum + m) * micro
        pos = np.arange(start, start + micro)[dist_info.rank :: dist_info.world_size]
        batch = _batch(run, order[pos], pos, view_of, aug_seed)
        sync = contextlib.nullcontext() if (m == cfg.grad_accum - 1 or not dist_info.enabled) else run.ddp_module.no_sync()
        with sync:
            with run.autocast:
                loss, logs = run.ddp_module(batch)
            loss = loss / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in run.module.parameters() if p.requires_grad], cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    run.scheduler.step()
    run.step_in_epoch += 1
    run.global_step += 1
    run.method.after_step(run.global_step)
    return logs


# -- epoch --------------------------------------------------------------------------------------
def _epoch_pairs(run: Run) -> np.ndarray:
    """The pairs of ``run.epoch`` in order: the saved ones when resumed mid-epoch, else the
    method's choice from the seeded order (kept pairs cycled to the epoch's length)."""
    cfg, method = run.cfg, run.method
    order = epoch_order(run.train_ds, run.epoch, cfg.seed, cfg.data.epoch_unit)
    if run.saved_order is not None:  # resumed mid-epoch: the pairs the method chose at its start
        order, run.saved_order = run.saved_order, None
    else:
        chosen = method.epoch_pairs(order, run.epoch, run.ctx)
        if chosen is not order:
            if len(chosen) == 0:
                raise RsitrError(f"method {method.name} kept no training pairs in epoch {run.epoch + 1}")
            # an epoch is a fixed number of steps: kept pairs are cycled to fill it
            order = np.resize(chosen, order.shape)
    run.order_now = order if not np.array_equal(order, epoch_order(run.train_ds, run.epoch, cfg.seed, cfg.data.epoch_unit)) else None
    return order


def run_epoch(run: Run, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train from ``run.step_in_epoch`` to the end of the epoch, or until ``max_steps`` or
    ``time_budget`` stops the run (``run.done``). Returns the epoch's log record; the epoch
    counter moves on when the epoch is finished."""
    cfg, dist_info, epoch = run.cfg, run.dist_info, run.epoch
    run.module.train()
    order = _epoch_pairs(run)
    view_rng = np.random.default_rng([cfg.seed, epoch, 0x71E])
    view_of = view_rng.integers(0, run.views, len(order))
    aug_seed = np.random.default_rng([cfg.seed, epoch, 0xA06]).integers(0, 2**31, len(order))
    bar = progress_bar(total=run.spe, initial=run.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (run.progress and dist_info.is_main),
                       leave=False, log_steps=2)
    running: list[float] = []
    terms: dict[str, list[float]] = {}  # the method's other logged values (loss terms, weights), per step
    while run.step_in_epoch < run.spe:
        logs = train_step(run, order, view_of, aug_seed)
        running.append(logs.get("loss", float("nan")))
        for k, v in logs.items():
            if k != "loss":
                terms.setdefault(k, []).append(float(v))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
        if cfg.save_every_steps and run.global_step % cfg.save_every_steps == 0:
            run.save(run.last_path, True)
        if on_step is not None:
            on_step(run.global_step)
        if run.global_step >= run.total_steps:
            run.done = True
            break
        if cfg.time_budget is not None:
            over = broadcast_object(run.elapsed() >= cfg.time_budget, dist_info)
            if over:
                log.info("time budget of %.0f s reached at step %d", cfg.time_budget, run.global_step)
                run.budget_stopped = True
                run.done = True
                break
    bar.close()
    finished_epoch = run.step_in_epoch >= run.spe or run.done
    record: dict[str, Any] = {"epoch": epoch + 1, "global_step": run.global_step, "loss": float(np.mean(running)) if running else None,
                              "lr": run.scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - run.t_start, 2)}
    if terms:
        record["terms"] = {k: float(np.mean(v)) for k, v in terms.items()}
    if finished_epoch:
        run.epoch += 1
        run.step_in_epoch = 0
    return record


# -- validate and checkpoint --------------------------------------------------------------------
def validate_and_checkpoint(run: Run, record: dict[str, Any]) -> None:
    """After an epoch (or the stop inside one): validate when due, keep the best, append
    ``record`` to ``log.jsonl``, write ``checkpoint_best.pt`` (when improved) and ``checkpoint_last.pt``."""
    cfg, dist_info, val_ds = run.cfg, run.dist_info, run.val_ds
    do_eval = len(val_ds) > 0 and cfg.eval_every > 0 and (run.epoch % cfg.eval_every == 0 or run.done or run.epoch == cfg.epochs)
    improved = False
    if dist_info.is_main:
        if do_eval:
            metrics = evaluate(run.backbone, val_ds, method=run.method, batch_size=cfg.eval_batch_size, workers=cfg.data.workers, device=run.device,
                               trunk_cache=run.val_cache, progress=run.progress)
            record["val"] = metrics
            improved = metrics[cfg.select_metric] > run.best[cfg.select_metric]
        elif len(val_ds) == 0 or cfg.eval_every == 0:
            improved = True  # no validation: the last checkpoint is the best
        if improved:
            run.best = {"epoch": run.epoch, "global_step": run.global_step, cfg.select_metric: record.get("val", {}).get(cfg.select_metric, float("nan")),
                        **record.get("val", {})}
        run.history.append(record)
        val_txt = f" val mR {record['val']['mR']:.2f}" if "val" in record else ""
        log.info("epoch %d: loss %.4f%s%s", record["epoch"], record["loss"] or float("nan"), val_txt, " (best)" if improved else "")
        with open(run.out / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    improved = broadcast_object(improved, dist_info)
    if improved:
        run.save(run.best_path, False)
    run.save(run.last_path, True)
    barrier(dist_info)


# -- the end ------------------------------------------------------------------------------------
def finish(run: Run, *, evaluate_test: bool = True) -> TrainResult:
    """Test metrics of the best checkpoint (``evaluate_test``), ``result.json``, and the process group closed."""
    cfg, dist_info = run.cfg, run.dist_info
    result = TrainResult(out_dir=run.out, best=run.best, history=run.history, trainable_params=run.n_train, total_params=run.n_total,
                         steps=run.global_step, planned_steps=run.total_steps, budget_stopped=run.budget_stopped, steps_per_epoch=run.spe)
    if evaluate_test and dist_info.is_main:
        test_ds = run.data.split(cfg.data.test_split)
        if len(test_ds):
            if run.best_path.exists():
                load_trainable_state(run.module, ckpt.TrainCheckpoint.load(run.best_path).state, str(run.best_path))
            result.test = evaluate(run.backbone, test_ds, method=run.method, batch_size=cfg.eval_batch_size, workers=cfg.data.workers, device=run.device,
                                   progress=run.progress, engine=_inference_engine(run.backbone, cfg))
    result.run_seconds = run.elapsed()
    result.seconds = result.run_seconds - run.elapsed_before
    if dist_info.is_main:
        atomic_write_json(run.out / "result.json", {"best_val": run.best, "test": result.test, "seconds": round(result.seconds, 2),
                                                    "run_seconds": round(result.run_seconds, 2),
                                                    "trainable_params": run.n_train, "total_params": run.n_total, "history": run.history,
                                                    "steps": run.global_step, "planned_steps": run.total_steps, "budget_stopped": run.budget_stopped})
    cleanup(dist_info)
    return result


def _info_dict(backbone: Backbone) -> dict[str, Any]:
    i = backbone.info
    return {"kind": i.kind, "name": i.name, "config": dict(i.config), "weights": dict(i.weights)}
