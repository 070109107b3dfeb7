"""The method interface: what the training loop, evaluation, search and benchmarks call.

A method is a config that picks components. It receives the image/text
:class:`~rsitr.models.base.Features` of a batch (computed by the backbone, or by its heads on
cached frozen-trunk outputs) and returns the loss; it scores an encoded split for evaluation and
search. Extra trainable modules (heads, adapters, EMA teachers...) are its submodules.

Every method

* registers itself by name (``@register_method``; :func:`list_methods`, :func:`method_class`,
  :func:`build_method`);
* declares its options as a dataclass (``Options``), read by :func:`rsitr.utils.config.from_mapping`
  -- unknown keys are rejected there, the caller's mapping is never modified, ``method.opts`` is the
  method's own typed copy and ``method.options`` its plain-dict form (what a checkpoint stores);
* declares what it can do in :attr:`Method.capabilities` (:class:`Capabilities`), which callers
  read instead of probing for attributes or names.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from rsitr.data.types import CaptionDataset, normalise_caption
from rsitr.losses.contrastive import info_nce
from rsitr.models.base import Backbone, Features
from rsitr.retrieval.twostage import TwoStageParams
from rsitr.utils.config import from_mapping
from rsitr.utils.distributed import gather_rows
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capabilities:
    """What a method does beyond the baseline (read by the loop, evaluation, search and combo).

    * ``two_stage``: :meth:`Method.similarity_pair` gives one matrix per query direction and
      :meth:`Method.two_stage_params` the recall/rerank parameters search uses (FTF);
    * ``reranker``: the name of the re-ranker :meth:`Method.rerank` applies to its scores
      (iEBAKER's ``"sar"``), None when it applies none;
    * ``own_scoring``: :meth:`Method.score` is not the plain pooled cosine (FTF, iEBAKER's local mix);
    * ``train_tokens``: its loss needs token-level features (cached trunk features keep them);
    * ``score_tokens``: its scoring needs token-level features;
    * ``trunk_cache``: it trains on cached frozen-trunk features (the loop's cache) as well as on pixels.

    Every method scores image-text pairs (``similarity``: an ``[images, texts]`` matrix).
    """

    two_stage: bool = False
    reranker: str | None = None
    own_scoring: bool = False
    train_tokens: bool = False
    score_tokens: bool = False
    trunk_cache: bool = True

    @property
    def cosine(self) -> bool:
        """Whether the method's test score is the plain pooled cosine: no own scoring, no token
        scoring, no two-stage scoring and no re-ranker. Only then do cosine-based test-time options
        (QB-Norm) score what the method scores."""
        return not (self.two_stage or self.reranker or self.own_scoring or self.score_tokens)


SCORING_KINDS = ("cosine", "two_stage", "fine_mix", "local_mix")


@dataclass(frozen=True)
class CandidateScoring:
    """How a method scores one free-text query against image candidates recalled by the pooled
    cosine -- what search asks of a checkpoint's method so that it ranks as ``rsitr eval`` does.

    * ``kind``: ``"cosine"`` (the recall order is the method's order: baseline, RDB, PEFT),
      ``"two_stage"`` (FTF: the top ``depth`` candidates rescored by the word x patch interaction),
      ``"fine_mix"`` (FTF ``rerank: exhaustive``: every pair mixed with the interaction at eval)
      or ``"local_mix"`` (iEBAKER ``local``: global cosine mixed with the local similarity);
    * ``needs_tokens``: :meth:`Method.rescore` reads image tokens (an index built with ``--keep-tokens``);
    * ``depth``: the number of recalled candidates eval rescores (FTF's ``k``); None: eval
      scores every image, search rescores as many candidates as it is told (``--rerank-depth``);
    * ``unavailable``: why part of eval's scoring cannot apply to one free-text query (SAR needs
      a set of queries), None when all of it can.
    """

    kind: str = "cosine"
    needs_tokens: bool = False
    depth: int | None = None
    unavailable: str | None = None


SAR_FOR_ONE_QUERY = ("SAR re-sorts candidates by the reverse rank of the query among a set of texts each candidate image ranks, "
                     "and a free-text search has no such query set")


@dataclass
class BaselineOptions:
    """The baseline has no options."""


class Method(nn.Module):
    """Base: symmetric InfoNCE on the pooled embeddings with the backbone's learnable temperature.

    Hooks a method may override (the loop, evaluation and search call only these):

    * ``loss(backbone, img, txt, batch)`` -> (loss, logs): ``batch`` holds ``image_index``,
      ``text_index`` (into the training split), ``epoch`` and ``labels`` (scene class per
      image, -1 when unknown) when the dataset has classes;
    * ``epoch_pairs(order, epoch, ctx)`` -> the (image, caption) pairs to train on this epoch
      (iEBAKER's EBA drops pairs here); ``ctx`` is a :class:`TrainContext`;
    * ``after_step(step)``: after each optimizer step (EMA teachers);
    * ``score(backbone, enc)`` -> ``[n_images, n_texts]`` scores before re-ranking, ``rerank(sim,
      direction)`` -> the re-ranked matrix, ``similarity(backbone, enc)`` = both;
      ``similarity_pair(backbone, enc)`` -> ``(t2i matrix, i2t matrix)``; ``enc`` is a
      :class:`rsitr.eval.evaluate.Encoded`, with token features when ``capabilities.score_tokens``;
    * ``two_stage_params()``: how a two-stage method recalls and reranks (None otherwise);
    * ``install(backbone)``: put adapters into the backbone's blocks (called before the trained
      state is loaded, at training and at load time; idempotent).

    ``train_data`` is None when a method is rebuilt from a checkpoint: everything a method
    derives from the data (e.g. the number of classes) must go into ``self.opts`` or its state so
    that it can be rebuilt without it.
    """

    name: ClassVar[str] = "baseline"
    label: ClassVar[str] = "baseline"  # how error messages name the method
    Options: ClassVar[type] = BaselineOptions
    combinable: ClassVar[bool] = True  # may be a part of ``combo``
    # the option values that switch this method's pooled InfoNCE off (``combo`` keeps one); None: it cannot
    contrastive_off: ClassVar[dict[str, Any] | None] = None

    def __init__(self, backbone: Backbone, options: Mapping[str, Any] | None, train_data: CaptionDataset | None):
        super().__init__()
        self.opts = self.parse_options(options)
        if backbone.logit_scale is None:
            # backbones without a temperature get one here (CLIP init: log(1/0.07))
            self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        else:
            self.logit_scale = None

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | None):
        """The typed options of a mapping (unknown keys rejected; the mapping is not modified)."""
        return from_mapping(cls.Options, options, what=f"{cls.label} option")

    @property
    def options(self) -> dict[str, Any]:
        """The options as a plain dict (what a checkpoint stores and the method is rebuilt from)."""
        return dataclasses.asdict(self.opts)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    @property
    def needs_tokens(self) -> bool:
        """Whether training features (and cached trunk features) must keep their tokens."""
        return self.capabilities.train_tokens

    @property
    def rerank_needs_tokens(self) -> bool:
        """Whether scoring needs token-level features."""
        return self.capabilities.score_tokens

    # -- shared state (``combo`` hands one to every part) ---------------------------------------
    def share_temperature(self, logit_scale: nn.Parameter | None) -> None:
        """Use ``logit_scale`` as this method's own temperature (when it has one: backbones
        without a temperature)."""
        if self.logit_scale is not None and logit_scale is not None:
            self.logit_scale = logit_scale

    _fn_text: torch.Tensor | None = None  # false-negative masking (see mask_false_negatives)
    _fn_image: torch.Tensor | None = None
    positives = "single"  # or "multi": same-sentence batch pairs are positives (see set_positives)

    def set_positives(self, positives: str) -> None:
        """``method.positives``: ``"single"`` (the papers: the matched pair is the one positive) or
        ``"multi"`` (a batch caption whose sentence also describes another batch image counts that
        image as a positive: soft targets spread over the positives in every contrastive loss that
        reads :meth:`same_text`; needs :meth:`mask_false_negatives`'s sentence table)."""
        from rsitr.losses.contrastive import POSITIVES

        if positives not in POSITIVES:
            raise RsitrError(f"method.positives must be one of {POSITIVES}, got {positives!r}")
        self.positives = positives

    def mask_false_negatives(self, train_data: CaptionDataset) -> None:
        """From now on :meth:`same_text` tells which batch pairs share a sentence
        (``method.false_negatives: mask``): every caption gets the id of its normalised text
        (lower case, single spaces), every image the ids of its captions."""
        texts, owner = train_data.texts()
        ids: dict[str, int] = {}
        tid = [ids.setdefault(normalise_caption(t), len(ids)) for t in texts]
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

    def use_false_negatives(self, other: "Method") -> None:
        """Read the same-text table of ``other`` (after its :meth:`mask_false_negatives`)."""
        self._fn_text, self._fn_image = other._fn_text, other._fn_image

    def temperature(self, backbone: Backbone) -> torch.Tensor:
        return backbone.logit_scale if self.logit_scale is None else self.logit_scale

    # -- training -------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = info_nce(img.pooled, txt.pooled, self.temperature(backbone), same=self.same_text(batch, img.pooled.shape[0]), positives=self.positives)
        return loss, {"loss": float(loss.detach())}

    def install(self, backbone: Backbone) -> None:
        pass

    def epoch_pairs(self, order: np.ndarray, epoch: int, ctx: "TrainContext") -> np.ndarray:
        return order

    def after_step(self, step: int) -> None:
        pass

    # -- scoring --------------------------------------------------------------------------------
    def score(self, backbone: Backbone, enc) -> torch.Tensor:
        """``[n_images, n_texts]`` scores before re-ranking (default: pooled cosine)."""
        return enc.images @ enc.texts.t()

    def rerank(self, sim: torch.Tensor, direction: str | None = None) -> torch.Tensor:
        """Re-rank a score matrix (``direction``: ``"t2i"`` / ``"i2t"`` when only that direction
        of ``sim`` is meaningful, None: the method's own setting). Default: unchanged."""
        return sim

    def similarity(self, backbone: Backbone, enc) -> torch.Tensor:
        return self.rerank(self.score(backbone, enc))

    def similarity_pair(self, backbone: Backbone, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t2i matrix, i2t matrix)``: texts rank images by the first (column-wise), images rank
        texts by the second (row-wise). One matrix serves both unless ``capabilities.two_stage``."""
        s = self.similarity(backbone, enc)
        return s, s

    def score_direction(self) -> str | None:
        """The query direction :meth:`score`'s matrix is meaningful for (None: both)."""
        return None

    def two_stage_params(self) -> TwoStageParams | None:
        """Recall/rerank parameters of a two-stage method (None: not one)."""
        return None

    # -- search (one free-text query against recalled image candidates) ------------------------
    def candidate_scoring(self) -> CandidateScoring:
        """How :meth:`rescore` scores a query's recalled candidates (default: the recall cosine)."""
        return CandidateScoring()

    @torch.no_grad()
    def rescore(self, coarse: torch.Tensor, query: Features, cand_tokens: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """The method's scores ``[b, k]`` of ``b`` text queries against their ``k`` recalled image
        candidates, the same numbers its :meth:`score` gives those pairs at evaluation.
        ``coarse [b, k]``: the candidates' pooled cosines; ``query``: the queries' text features
        (tokens ``[b, Nw, d]``, mask ``[b, Nw]``); ``cand_tokens [b, k, Np, d]`` / ``cand_mask
        [b, k, Np]``: the candidates' image tokens (empty unless ``candidate_scoring().needs_tokens``).
        Default: the cosine unchanged."""
        return coarse


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


# -- the registry -----------------------------------------------------------------------------
_METHODS: dict[str, type[Method]] = {}
# modules that register the built-in methods; imported on first use, so a method costs nothing until used
BUILTIN_MODULES = ("rsitr.methods.rdb", "rsitr.methods.iebaker", "rsitr.methods.ftf", "rsitr.methods.combo", "rsitr.methods.peft")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name: <cls.name>``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise RsitrError(f"method name {cls.name!r} registered twice ({_METHODS[cls.name].__qualname__}, {cls.__qualname__})")
    _METHODS[cls.name] = cls
    return cls


register_method(Method)


def _load_builtin() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def list_methods() -> list[str]:
    """Names of every registered method."""
    _load_builtin()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        _load_builtin()
    if name not in _METHODS:
        raise RsitrError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def build_method(name: str, backbone: Backbone, options: Mapping[str, Any] | None, train_data: CaptionDataset | None) -> Method:
    method = method_class(name)(backbone, options, train_data)
    method.install(backbone)
    return method
