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
  only one part keeps it -- the part that cannot switch it off (``Method.contrastive_off`` is
  None: iEBAKER, whose EBA-masked InfoNCE is its core, or the baseline) when there is one, else
  the first part -- and the others get their ``contrastive_off`` options (RDB
  ``loss_contrastive: false``, FTF ``coarse_weight: 0``) unless their options say otherwise;
* **temperature**: one learnable temperature shared by every part (the backbone's, or one
  created here for backbones without it);
* **EMA teachers** (``after_step``): every part's;
* **scoring**, by capability (:class:`~rsitr.methods.base.Capabilities`): the scores of the first
  part with two-stage scoring (FTF: one matrix per direction), else of the first part with its own
  scoring (iEBAKER's local mix), else cosine; then the re-ranker of the first part that has one
  (iEBAKER's SAR) -- on two-stage matrices each direction is re-ranked within its own matrix
  (``rerank(sim, "t2i" | "i2t")``), *our choice*, since SAR's reverse ranks need a single matrix.

The options saved with the checkpoint are each part's complete options (including what they
derived from the data: RDB's classes, iEBAKER's keyword vocabulary), so the combination is
rebuilt exactly by :func:`rsitr.methods.factory.load`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rsitr.data.types import CaptionDataset
from rsitr.methods.base import Capabilities, CandidateScoring, Method, TrainContext, method_class, register_method
from rsitr.models.base import Backbone, Features
from rsitr.retrieval.twostage import TwoStageParams
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


@dataclass
class ComboOptions:
    """``parts``: method name -> its options; ``dedup_contrastive``: one pooled InfoNCE (see the module doc)."""

    parts: dict[str, Any] = field(default_factory=dict)
    dedup_contrastive: bool = True


@register_method
class Combo(Method):
    name = "combo"
    label = "combo"
    Options = ComboOptions
    combinable = False

    @classmethod
    def parse_options(cls, options):
        """The combo's options, each combinable part's own options read (and range-checked) by its class."""
        opts = super().parse_options(options)
        if isinstance(opts.parts, dict):
            for n, popts in opts.parts.items():
                if n in _combinable():
                    method_class(n).parse_options(popts or {})
        return opts

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data: CaptionDataset | None):
        super().__init__(backbone, options, train_data)
        parts = self.opts.parts
        if not isinstance(parts, dict) or not parts:
            raise RsitrError("combo: options.parts must map method names to their options, e.g. {iebaker: {eba: true}, ftf: {}}")
        classes = {n: method_class(n) if n in _combinable() else None for n in parts}
        bad = [n for n, c in classes.items() if c is None]
        if bad:
            raise RsitrError(f"combo: cannot combine {bad}; parts may be {_combinable()}")
        dedup = bool(self.opts.dedup_contrastive)
        names = list(parts)
        fixed = [n for n in names if classes[n].contrastive_off is None]  # parts whose pooled InfoNCE cannot be switched off
        owner = fixed[0] if fixed else names[0]
        self.parts = nn.ModuleDict()
        final: dict[str, dict[str, Any]] = {}
        for n in names:
            popts = dict(parts[n] or {})
            off = classes[n].contrastive_off
            if dedup and n != owner:
                if off is None:
                    raise RsitrError(f"combo: '{n}' cannot switch its contrastive loss off and '{owner}' owns it; "
                                     f"list at most one of {[m for m in _combinable() if method_class(m).contrastive_off is None]}, "
                                     "or set dedup_contrastive: false")
                for k, v in off.items():
                    popts.setdefault(k, v)
            part = classes[n](backbone, popts, train_data)
            part.share_temperature(self.logit_scale)  # one temperature (parts made their own for a backbone without one)
            self.parts[n] = part
            final[n] = dict(part.options)
        self.opts.parts = final
        self.opts.dedup_contrastive = dedup
        self._scorer = next((p for p in self.parts.values() if p.capabilities.two_stage), None) \
            or next((p for p in self.parts.values() if p.capabilities.own_scoring), None)
        self._reranker = next((p for p in self.parts.values() if p.capabilities.reranker is not None), None)
        log.info("combo: %s (pooled InfoNCE from %s)", " + ".join(names), owner if dedup else "every part")

    @property
    def capabilities(self) -> Capabilities:
        caps = [p.capabilities for p in self.parts.values()]
        return Capabilities(two_stage=any(c.two_stage for c in caps), reranker=next((c.reranker for c in caps if c.reranker), None),
                            own_scoring=any(c.own_scoring for c in caps), train_tokens=any(c.train_tokens for c in caps),
                            score_tokens=any(c.score_tokens for c in caps), trunk_cache=all(c.trunk_cache for c in caps))

    def install(self, backbone: Backbone) -> None:
        for part in self.parts.values():
            part.install(backbone)

    def set_positives(self, positives: str) -> None:
        super().set_positives(positives)
        for part in self.parts.values():
            part.set_positives(positives)

    def mask_false_negatives(self, train_data: CaptionDataset) -> None:
        super().mask_false_negatives(train_data)
        for part in self.parts.values():  # the parts' contrastive losses read the same table
            part.use_false_negatives(self)

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
    def score(self, backbone: Backbone, enc) -> torch.Tensor:
        return self._scorer.score(backbone, enc) if self._scorer is not None else enc.images @ enc.texts.t()

    def rerank(self, sim: torch.Tensor, direction: str | None = None) -> torch.Tensor:
        return self._reranker.rerank(sim, direction) if self._reranker is not None else sim

    def score_direction(self) -> str | None:
        return self._scorer.score_direction() if self._scorer is not None else None

    @torch.no_grad()
    def similarity(self, backbone: Backbone, enc) -> torch.Tensor:
        return self.rerank(self.score(backbone, enc), self.score_direction())

    @torch.no_grad()
    def similarity_pair(self, backbone: Backbone, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t2i matrix, i2t matrix)``, each direction ranked by its own matrix."""
        if self.score_direction() is None:
            s = self.similarity(backbone, enc)
            return s, s
        t2i, i2t = self._scorer.similarity_pair(backbone, enc)
        return self.rerank(t2i, "t2i"), self.rerank(i2t, "i2t")

    def two_stage_params(self) -> TwoStageParams | None:
        return self._scorer.two_stage_params() if self._scorer is not None else None

    def candidate_scoring(self) -> CandidateScoring:
        """The scoring part's, with the re-ranking part's reason when its re-ranking cannot apply to one query."""
        plan = self._scorer.candidate_scoring() if self._scorer is not None else CandidateScoring()
        why = self._reranker.candidate_scoring().unavailable if self._reranker is not None else None
        return dataclasses.replace(plan, unavailable=why or plan.unavailable)

    @torch.no_grad()
    def rescore(self, coarse: torch.Tensor, query: Features, cand_tokens: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        return self._scorer.rescore(coarse, query, cand_tokens, cand_mask) if self._scorer is not None else coarse


def _combinable() -> list[str]:
    from rsitr.methods.base import list_methods

    return [n for n in list_methods() if method_class(n).combinable]


__all__ = ["Combo", "ComboOptions"]
