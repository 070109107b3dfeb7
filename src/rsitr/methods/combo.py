"""Methods combined: ``method.name: combo`` runs several methods' parts in one training run.

    method:
      name: combo
      options:
        parts:                      # method name -> its own options (see each method's doc)
          iebaker: {eba: true, ker: true, sar: true}
          rdb: {}
          ftf: {k: 100}

What each part brings, and how they compose:

* **adapters** (``install``): every part installs its own (RDB's VEA/TSA); the others see them,
  so FTF's fine scores and iEBAKER's EBA scores are computed on the adapted features;
* **pairs** (``epoch_pairs``): chained in the order given (iEBAKER's EBA drops pairs; the others
  keep what they get);
* **loss**: the sum of the parts' losses (logged per part as ``<part>/<term>``). The symmetric
  InfoNCE on the pooled embeddings is in every method; with ``dedup_contrastive`` (default on)
  only one part keeps it -- iEBAKER when present (its EBA-masked InfoNCE cannot be switched off),
  else the first part -- and the others get ``loss_contrastive: false`` (RDB) /
  ``coarse_weight: 0`` (FTF) unless their options say otherwise;
* **temperature**: one learnable temperature shared by every part (the backbone's, or one
  created here for backbones without it);
* **EMA teachers** (``after_step``): every part's;
* **scoring**: FTF's two-stage matrices when FTF is a part (one per direction), else iEBAKER's
  (global, optionally mixed with its local similarity), else cosine; then iEBAKER's SAR when it is
  on -- on FTF's matrices, each direction is re-ranked within its own matrix (``sar`` with
  ``direction`` t2i / i2t), *our choice*, since SAR's reverse ranks need a single matrix.

The options saved with the checkpoint are each part's complete options (including what they
derived from the data: RDB's classes, iEBAKER's keyword vocabulary), so the combination is
rebuilt exactly by ``load_model``.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from rsitr.data.types import CaptionDataset
from rsitr.models.base import Backbone, Features
from rsitr.train.methods import Method, TrainContext, method_class
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

COMBINABLE = ("iebaker", "rdb", "ftf", "baseline")
# how a part's own pooled InfoNCE is switched off when another part owns it
CONTRASTIVE_SWITCH: dict[str, tuple[str, Any] | None] = {"rdb": ("loss_contrastive", False), "ftf": ("coarse_weight", 0.0),
                                                         "iebaker": None, "baseline": None}


class Combo(Method):
    name = "combo"

    def __init__(self, backbone: Backbone, options: dict[str, Any], train_data: CaptionDataset | None):
        super().__init__(backbone, options, train_data)
        o = dict(self.options)
        unknown = sorted(set(o) - {"parts", "dedup_contrastive"})
        if unknown:
            raise RsitrError(f"combo: unknown option(s) {unknown}; known: dedup_contrastive, parts")
        parts = o.get("parts")
        if not isinstance(parts, dict) or not parts:
            raise RsitrError("combo: options.parts must map method names to their options, e.g. {iebaker: {eba: true}, ftf: {}}")
        bad = [n for n in parts if n not in COMBINABLE]
        if bad:
            raise RsitrError(f"combo: cannot combine {bad}; parts may be {list(COMBINABLE)}")
        dedup = bool(o.get("dedup_contrastive", True))
        names = list(parts)
        owner = "iebaker" if "iebaker" in names else names[0]
        self.parts = nn.ModuleDict()
        final: dict[str, dict[str, Any]] = {}
        for n in names:
            popts = dict(parts[n] or {})
            switch = CONTRASTIVE_SWITCH[n]
            if dedup and n != owner:
                if switch is None:
                    raise RsitrError(f"combo: '{n}' cannot switch its contrastive loss off and '{owner}' owns it; "
                                     "list at most one of iebaker/baseline, or set dedup_contrastive: false")
                popts.setdefault(*switch)
            part = method_class(n)(backbone, popts, train_data)
            self.parts[n] = part
            final[n] = dict(part.options)
        # one temperature: parts built for a backbone without one each made their own
        if self.logit_scale is not None:
            for part in self.parts.values():
                if part.logit_scale is not None:
                    part.logit_scale = self.logit_scale
        self.options = {"parts": final, "dedup_contrastive": dedup}
        self.needs_tokens = any(p.needs_tokens for p in self.parts.values())
        self.rerank_needs_tokens = any(p.rerank_needs_tokens for p in self.parts.values())
        log.info("combo: %s (pooled InfoNCE from %s)", " + ".join(names), owner if dedup else "every part")

    def install(self, backbone: Backbone) -> None:
        for part in self.parts.values():
            part.install(backbone)

    def mask_false_negatives(self, train_data: CaptionDataset) -> None:
        super().mask_false_negatives(train_data)
        for part in self.parts.values():  # the parts' contrastive losses read the same table
            part._fn_text, part._fn_image = self._fn_text, self._fn_image

    def loss(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total = None
        logs: dict[str, float] = {}
        for n, part in self.parts.items():
            loss, plogs = part.loss(backbone, img, txt, batch)
            total = loss if total is None else total + loss
            logs.update({f"{n}/{k}": v for k, v in plogs.items()})
        logs["loss"] = float(total.detach())
        return total, logs

    def epoch_pairs(self, order: np.ndarray, epoch: int, ctx: TrainContext) -> np.ndarray:
        for part in self.parts.values():
            order = part.epoch_pairs(order, epoch, ctx)
        return order

    def after_step(self, step: int) -> None:
        for part in self.parts.values():
            part.after_step(step)

    # -- scoring -----------------------------------------------------------------------------
    def _sar(self, sim: torch.Tensor, direction: str) -> torch.Tensor:
        from rsitr.retrieval.rerank import sar

        o = self.parts["iebaker"].options
        k = o["sar_k_t2i"] if direction == "t2i" else o["sar_k_i2t"]
        return sar(sim, k=int(k if k is not None else o["sar_k"]), direction=direction, reverse_weight=float(o["sar_reverse_weight"]))

    def _sar_on(self) -> bool:
        return "iebaker" in self.parts and bool(self.parts["iebaker"].sar_enabled)

    @torch.no_grad()
    def similarity_pair(self, backbone: Backbone, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t2i matrix, i2t matrix)``, each direction ranked by its own matrix."""
        if "ftf" not in self.parts:
            s = self.similarity(backbone, enc)
            return s, s
        t2i, i2t = self.parts["ftf"].similarity_pair(backbone, enc)
        if self._sar_on():
            t2i, i2t = self._sar(t2i, "t2i"), self._sar(i2t, "i2t")
        return t2i, i2t

    @torch.no_grad()
    def similarity(self, backbone: Backbone, enc) -> torch.Tensor:
        if "ftf" in self.parts:
            sim = self.parts["ftf"].similarity(backbone, enc)
            return self._sar(sim, str(self.parts["ftf"].options["eval_direction"])) if self._sar_on() else sim
        if "iebaker" in self.parts:
            return self.parts["iebaker"].similarity(backbone, enc)  # its local mix and SAR
        return enc.images @ enc.texts.t()


__all__ = ["COMBINABLE", "Combo"]
