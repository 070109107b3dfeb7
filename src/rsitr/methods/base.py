"""Methods are configs that pick components; the training loop calls only this interface.

A method receives the image/text :class:`~rsitr.models.base.Features` of a batch (computed by
the backbone, or by its heads on cached frozen-trunk outputs) and returns the loss. Extra
trainable modules (heads, adapters, EMA teachers...) live in ``method.modules``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rsitr.data.types import CaptionDataset
from rsitr.losses.contrastive import info_nce
from rsitr.models.base import Backbone, Features
from rsitr.train.distributed import gather_rows
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


class Method(nn.Module):
    """Base: symmetric InfoNCE on the pooled embeddings with the backbone's learnable temperature.

    Hooks a method may override (the loop and the evaluator call only these):

    * ``loss(backbone, img, txt, batch)`` -> (loss, logs): ``batch`` holds ``image_index``,
      ``text_index`` (into the training split), ``epoch`` and ``labels`` (scene class per
      image, -1 when unknown) when the dataset has classes;
    * ``epoch_pairs(order, epoch, ctx)`` -> the (image, caption) pairs to train on this epoch
      (iEBAKER's EBA drops pairs here); ``ctx`` is a :class:`TrainContext`;
    * ``after_step(step)``: after each optimizer step (EMA teachers);
    * ``similarity(backbone, enc)`` -> [n_images, n_texts] scores at evaluation/search time
      (FTF / SAR re-ranking); ``enc`` is a :class:`rsitr.retrieval.evaluate.Encoded`, with
      token features when ``rerank_needs_tokens``;
    * ``install(backbone)``: put adapters into the backbone's blocks (called before the trained
      state is loaded, at training and at load time).

    ``train_data`` is None when a method is rebuilt from a checkpoint: everything a method
    derives from the data (e.g. the number of classes) must go into ``self.options`` or its
    state so that it can be rebuilt without it.
    """

    name = "baseline"
    needs_tokens = False  # whether cached trunk features must keep token-level features
    rerank_needs_tokens = False  # whether ``similarity`` needs token-level features

    def __init__(self, backbone: Backbone, options: dict[str, Any], train_data: CaptionDataset | None):
        super().__init__()
        self.options = dict(options)
        if backbone.logit_scale is None:
            # backbones without a temperature get one here (CLIP init: log(1/0.07))
            self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        else:
            self.logit_scale = None

    _fn_text: torch.Tensor | None = None  # false-negative masking (see mask_false_negatives)
    _fn_image: torch.Tensor | None = None

    def mask_false_negatives(self, train_data: CaptionDataset) -> None:
        """From now on :meth:`same_text` tells which batch pairs share a sentence
        (``method.false_negatives: mask``): every caption gets the id of its normalised text
        (lower case, single spaces), every image the ids of its captions."""
        texts, owner = train_data.texts()
        ids: dict[str, int] = {}
        tid = [ids.setdefault(" ".join(t.lower().split()), len(ids)) for t in texts]
        per_image: list[list[int]] = [[] for _ in range(len(train_data))]
        for j, i in enumerate(owner):
            per_image[i].append(tid[j])
        width = max((len(p) for p in per_image), default=1) or 1
        table = torch.full((len(per_image), width), -1, dtype=torch.int64)
        for i, p in enumerate(per_image):
            table[i, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
        self._fn_text, self._fn_image = torch.as_tensor(tid, dtype=torch.int64), table
        log.info("false negatives masked: %d captions, %d distinct sentences", len(tid), len(ids))

    def same_text(self, batch: dict, n: int | None = None) -> torch.Tensor | None:
        """``[B images, B texts]`` bool: batch text j is a caption of batch image i (None unless
        :meth:`mask_false_negatives` was called). The diagonal is true. ``n``: the number of rows
        the loss sees; under torchrun the features are gathered from every process, and so are
        the indices here."""
        if self._fn_text is None or "text_index" not in batch:
            return None
        ti, ii = batch["text_index"], batch["image_index"]
        if n is not None and ti.shape[0] != n:
            ti, ii = gather_rows(ti), gather_rows(ii)
        t = self._fn_text[ti.cpu()]
        im = self._fn_image[ii.cpu()]
        return (im[:, :, None] == t[None, None, :]).any(1).to(ti.device)

    def temperature(self, backbone: Backbone) -> torch.Tensor:
        return backbone.logit_scale if self.logit_scale is None else self.logit_scale

    def loss(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = info_nce(img.pooled, txt.pooled, self.temperature(backbone), same=self.same_text(batch, img.pooled.shape[0]))
        return loss, {"loss": float(loss.detach())}

    def install(self, backbone: Backbone) -> None:
        pass

    def epoch_pairs(self, order: np.ndarray, epoch: int, ctx: "TrainContext") -> np.ndarray:
        return order

    def after_step(self, step: int) -> None:
        pass

    def similarity(self, backbone: Backbone, enc) -> torch.Tensor:
        return enc.images @ enc.texts.t()


@dataclass
class TrainContext:
    """What ``Method.epoch_pairs`` may use: the backbone, the training split, and
    ``encode()`` -> (image Features [N], text Features [M]) of every training image (eval view)
    and caption (``train_data.texts()`` order), computed with the current weights (through the
    frozen-trunk cache when there is one)."""

    backbone: Backbone
    train_data: CaptionDataset
    encode: Callable[[], tuple[Features, Features]]
    out_dir: Path


# name -> "module:Class" (imported on first use, so optional methods cost nothing)
METHODS: dict[str, type[Method] | str] = {
    "baseline": Method,
    "rdb": "rsitr.methods.rdb:RDB",
    "iebaker": "rsitr.methods.iebaker:IEBAKER",
    "ftf": "rsitr.methods.ftf:FTF",
    "combo": "rsitr.methods.combo:Combo",
    # PEFT baselines RDB is compared with
    "adapter": "rsitr.methods.peft:BottleneckAdapterMethod",
    "lora": "rsitr.methods.peft:LoRAMethod",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise RsitrError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    cls = METHODS[name]
    if isinstance(cls, str):
        import importlib

        mod, attr = cls.split(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise RsitrError(f"method {name!r} is not available in this build ({exc})") from exc
        METHODS[name] = cls
    return cls


def build_method(name: str, backbone: Backbone, options: dict[str, Any], train_data: CaptionDataset | None) -> Method:
    method = method_class(name)(backbone, options, train_data)
    method.install(backbone)
    return method
