"""iEBAKER's method: its options and the :class:`~rsitr.methods.base.Method` that puts EBA
(:mod:`~rsitr.methods.iebaker.eba`), the local similarity (:mod:`~rsitr.methods.iebaker.local`),
KER (:mod:`~rsitr.methods.iebaker.ker`) and SAR (:mod:`~rsitr.methods.iebaker.sar`) together.
Each part is switched on alone (``eba``, ``ker``, ``sar``); with all three off the method is the
baseline (symmetric InfoNCE on the pooled embeddings with the learnable temperature).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rsitr.data.types import CaptionDataset
from rsitr.losses.contrastive import symmetric_ce
from rsitr.losses.iebaker import masked_info_nce
from rsitr.methods.base import SAR_FOR_ONE_QUERY, Capabilities, CandidateScoring, Method, TrainContext, register_method
from rsitr.methods.iebaker.eba import CRITERIA, EBAMixin, _is_main
from rsitr.methods.iebaker.ker import KERMixin
from rsitr.methods.iebaker.local import local_similarity, local_similarity_matrix
from rsitr.methods.iebaker.sar import SARMixin
from rsitr.methods.keywords import save_vocab
from rsitr.models.base import Backbone, Features
from rsitr.utils.distributed import gather_rows
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


@dataclass
class IEBAKEROptions:
    """iEBAKER's options (see the module doc)."""

    # allowed values, checked when the options are read (rsitr.utils.config.check_declared_ranges)
    RANGES: ClassVar[dict] = {"eba_fraction": (0, 1, False), "eba_joint_local_weight": (0, None, False), "eba_min_keep": (0, None, False),
                              "eba_warmup_epochs": (0, None, False), "eba_every": (1, None, False), "local_weight": (0, None, False),
                              "local_scale": (0, None, True), "local_eval_weight": (0, None, False), "ker_weight": (0, None, False),
                              "ker_negatives": (1, None, False), "ker_pool": (0, None, False), "ker_vocab_size": (1, None, False),
                              "ker_min_count": (1, None, False), "ker_seed": (0, None, False), "sar_k": (1, None, False),
                              "sar_k_t2i": (1, None, False), "sar_k_i2t": (1, None, False), "sar_reverse_weight": (0, None, False)}
    FINITE: ClassVar[bool] = True

    # EBA
    eba: bool = False
    eba_criterion: str = "global_fraction"  # global_fraction | per_image_fraction | threshold
    eba_fraction: float = 0.01
    eba_threshold: float = 0.0
    eba_threshold_local: float = 0.0
    eba_scheme: str = "joint"  # joint | separate
    eba_joint_local_weight: float = 0.0
    eba_min_keep: int = 1
    eba_warmup_epochs: int = 1
    eba_every: int = 1
    eba_write: bool = True
    # local similarity
    local: bool = False
    local_weight: float = 1.0
    local_scale: float = 20.0
    local_eval_weight: float = 0.4
    # KER
    ker: bool = False
    ker_mode: str = "swap"  # swap | mask | both
    ker_weight: float = 0.5
    ker_negatives: int = 2
    ker_pool: int = 4
    ker_vocab: list[str] | None = None
    ker_vocab_file: str | None = None
    ker_vocab_size: int = 512
    ker_min_count: int = 2
    ker_seed: int = 0
    ker_mask_token: str = "[MASK]"
    # SAR
    sar: bool = False
    rerank: str | None = "none"  # none | sar (alias of sar: true; what `rsitr eval --rerank sar` sets)
    sar_k: int = 10
    sar_k_t2i: int | None = None
    sar_k_i2t: int | None = None
    sar_reverse_weight: float = 1.0
    sar_direction: str = "both"


@register_method
class IEBAKER(EBAMixin, KERMixin, SARMixin, Method):
    name = "iebaker"
    label = "iebaker"
    Options = IEBAKEROptions

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data: CaptionDataset | None):
        super().__init__(backbone, options, train_data)
        o = self.opts
        self._validate(o)
        self._build_ker(backbone, train_data)

        # EBA per-pair flags (bit 0: out of the global loss, bit 1: out of the local loss) of the
        # last scoring, and the epoch of that scoring (-1: none yet)
        n_caps = train_data.n_captions if train_data is not None else 0
        self.register_buffer("eba_drop", torch.zeros(n_caps, dtype=torch.uint8))
        self.register_buffer("eba_epoch", torch.tensor(-1, dtype=torch.long))
        self._texts: list[str] | None = train_data.texts()[0] if train_data is not None else None

    # -- options ---------------------------------------------------------------------------------
    @staticmethod
    def _validate(o: IEBAKEROptions) -> None:
        if o.eba_criterion not in CRITERIA:
            raise RsitrError(f"iebaker: eba_criterion must be one of {CRITERIA}, got {o.eba_criterion!r}")
        if o.eba_scheme not in ("joint", "separate"):
            raise RsitrError(f"iebaker: eba_scheme must be 'joint' or 'separate', got {o.eba_scheme!r}")
        if o.eba and o.eba_scheme == "separate" and not o.local:
            raise RsitrError("iebaker: eba_scheme=separate filters the global and the local loss separately; it needs local=true")
        if not 0.0 <= float(o.eba_fraction) <= 1.0:
            raise RsitrError(f"iebaker: eba_fraction must be in [0, 1], got {o.eba_fraction}")
        if int(o.eba_every) < 1 or int(o.eba_warmup_epochs) < 0 or int(o.eba_min_keep) < 0:
            raise RsitrError("iebaker: eba_every must be >= 1, eba_warmup_epochs and eba_min_keep >= 0")
        if o.ker_mode not in ("swap", "mask", "both"):
            raise RsitrError(f"iebaker: ker_mode must be swap, mask or both, got {o.ker_mode!r}")
        if int(o.ker_negatives) < 1 or int(o.ker_pool) < 0:
            raise RsitrError("iebaker: ker_negatives must be >= 1 and ker_pool >= 0")
        if o.rerank not in (None, "none", "sar"):
            raise RsitrError(f"iebaker: rerank must be 'none' or 'sar', got {o.rerank!r}")
        if o.sar_direction not in ("both", "t2i", "i2t"):
            raise RsitrError(f"iebaker: sar_direction must be both, t2i or i2t, got {o.sar_direction!r}")
        if o.sar_direction == "both" and float(o.sar_reverse_weight) != 1.0:
            raise RsitrError("iebaker: sar_direction=both needs sar_reverse_weight=1 (one key per pair serves both directions)")

    @property
    def capabilities(self) -> Capabilities:
        o = self.opts
        local_scoring = bool(o.local) and float(o.local_eval_weight) > 0
        return Capabilities(reranker="sar" if self.sar_enabled else None, own_scoring=local_scoring, train_tokens=bool(o.local),
                            score_tokens=local_scoring)

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.opts
        epoch = int(batch.get("epoch", 0))
        n = img.pooled.shape[0]
        keep_g = keep_l = None
        if o.eba_scheme == "separate" and self._eba_active(epoch) and int(self.eba_epoch) >= 0:
            idx = gather_rows(batch["text_index"], n)
            flags = self.eba_drop.to(idx.device)[idx]
            keep_g, keep_l = (flags & 1) == 0, (flags & 2) == 0
        scale = self.temperature(backbone)
        loss_g = masked_info_nce(img.pooled, txt.pooled, scale, keep_g, same=self.same_text(batch, n), positives=self.positives)
        total = loss_g
        logs = {"loss_global": float(loss_g.detach())}
        if o.local:
            sim_l = local_similarity(txt.tokens, txt.mask, img.tokens, img.mask).t()  # [images, texts]
            loss_l = symmetric_ce(float(o.local_scale) * sim_l, keep_l)
            total = total + float(o.local_weight) * loss_l
            logs["loss_local"] = float(loss_l.detach())
        if o.ker and self._texts is not None:
            lo, hi = _local_rows(n, batch["text_index"].shape[0])
            texts = [self._texts[int(t)] for t in batch["text_index"].tolist()]
            tidx = batch["text_index"].tolist()
            v = img.pooled[lo:hi]
            t = txt.pooled[lo:hi]
            if o.ker_mode in ("swap", "both"):
                loss_k = self._ker_swap_loss(backbone, v, t, texts, tidx, epoch, scale)
                total = total + float(o.ker_weight) * loss_k
                logs["loss_ker"] = float(loss_k.detach())
            if o.ker_mode in ("mask", "both"):
                loss_m = self._ker_mask_loss(backbone, v, texts, tidx, epoch)
                total = total + float(o.ker_weight) * loss_m
                logs["loss_ker_mask"] = float(loss_m.detach())
        logs["loss"] = float(total.detach())
        return total, logs

    def epoch_pairs(self, order: np.ndarray, epoch: int, ctx: TrainContext) -> np.ndarray:
        if self.kw is not None and _is_main():
            vocab_path = Path(ctx.out_dir) / "ker_vocab.txt"
            if not vocab_path.exists():  # for inspection; the checkpoint carries it in the options
                save_vocab(self.kw.vocab, vocab_path)
        if not self._eba_active(epoch):
            return order
        return self._eliminate_before_align(order, epoch, ctx)

    # -- search --------------------------------------------------------------------------------
    def candidate_scoring(self) -> CandidateScoring:
        """The local mix when eval scores with it (``local`` and ``local_eval_weight > 0``), else
        the cosine; SAR (``sar``/``rerank: sar``) has no counterpart for one free-text query."""
        local = self.capabilities.own_scoring
        return CandidateScoring("local_mix" if local else "cosine", needs_tokens=local,
                                unavailable=f"iEBAKER's SAR re-ranking is not applied: {SAR_FOR_ONE_QUERY}" if self.sar_enabled else None)

    @torch.no_grad()
    def rescore(self, coarse: torch.Tensor, query: Features, cand_tokens: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """``(1 - w) cosine + w local`` of each query with its candidates (what :meth:`score` gives)."""
        if not self.capabilities.own_scoring:
            return coarse
        b, k = coarse.shape
        t = query.tokens.float()[:, None].expand(b, k, *query.tokens.shape[1:]).reshape(b * k, *query.tokens.shape[1:])
        tm = query.mask[:, None].expand(b, k, query.mask.shape[1]).reshape(b * k, -1)
        loc = local_similarity(t, tm, cand_tokens.reshape(b * k, *cand_tokens.shape[2:]), cand_mask.reshape(b * k, -1), pairwise=False)
        w = float(self.opts.local_eval_weight)
        return (1 - w) * coarse.float() + w * loc.view(b, k)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, backbone: Backbone, enc) -> torch.Tensor:
        """Global cosine, mixed with the local similarity (``local_eval_weight``) when ``local``."""
        o = self.opts
        sim = enc.images @ enc.texts.t()
        w = float(o.local_eval_weight)
        if o.local and w > 0 and enc.image_features is not None and enc.text_features is not None:
            sim = (1 - w) * sim + w * local_similarity_matrix(enc.image_features, enc.text_features)
        return sim


def _local_rows(n_total: int, n_local: int) -> tuple[int, int]:
    """Rows of this process's own pairs in (possibly all-gathered) batch features."""
    if n_total == n_local:
        return 0, n_local
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank * n_local, (rank + 1) * n_local
