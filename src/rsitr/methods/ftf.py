"""FTF - Fast-Then-Fine (Chen et al., arXiv 2604.20429), as ``method.name: ftf``.

Retrieval is two-stage (:mod:`rsitr.retrieval.twostage`): a text-agnostic recall over the pooled
("coarse") embeddings with a FAISS index, then a rerank of the top ``k`` candidates with the
parameter-free balanced text-guided interaction between word and patch tokens
(:mod:`rsitr.retrieval.interaction`). The method adds no trainable module of its own (only the
temperature when the backbone has none); it trains the backbone's trainable part (heads,
adapters or towers, per ``model.mode``) with an inter- plus intra-modal loss over two
granularities (pooled embedding, token set).

Loss (``loss``), each term weighted by an option:

* ``coarse_weight`` (1.0) x inter-modal symmetric InfoNCE on the pooled embeddings (the recall
  stage's space), with the model's learnable temperature.
* ``fine_weight`` (1.0) x inter-modal symmetric InfoNCE on the in-batch fine scores
  ``fine_scores(img tokens, txt tokens)`` ``[B, B]`` (the rerank stage's score), scaled by the
  model's temperature (``fine_logit_scale``: null) or by a fixed ``fine_logit_scale`` (a log
  inverse temperature). ``fine_candidates`` (null = the whole batch): score only each query's
  ``fine_candidates`` best in-batch candidates by coarse cosine (the positive always among them)
  and take the cross-entropy over those, in both directions -- the fine stage is trained on what
  the recall stage hands it at search time, and the cost drops from ``B x B`` to ``B x k``
  interactions per step (*our choice*, for CPU training; with ``k >= B`` it equals the full loss).
* ``intra_weight`` (0.5) x intra-modal term, ``intra_mode``:
  ``"granularity"`` (default; *our choice* - the paper's intra-modal loss is described as
  aligning multi-granular representations): within each modality, a symmetric InfoNCE between
  an item's pooled embedding and the masked mean of its own tokens, the other items of the batch
  as negatives - so the coarse vector and the token set of one image (caption) describe the same
  thing and differ from the others', which keeps recall and rerank consistent;
  ``"structure"``: within each modality, KL between the in-batch similarity distributions of the
  pooled embeddings and of the token means (image-image and text-text structure of the two
  granularities agree; symmetric, both sides trained); ``"none"``: off.

Evaluation (``similarity``): ``rerank`` = ``"two_stage"`` (default) scores the split with
:func:`~rsitr.retrieval.twostage.two_stage` (``k`` candidates, ``alpha`` weighting, ``tau``,
``balance``, ``renorm``, ``index_kind``); ``"exhaustive"`` scores every pair with the
combined score; ``"none"`` the pooled cosine only. The evaluator takes one matrix: we return the
text->image two-stage matrix (``eval_direction: t2i``; ``i2t`` returns the image->text one).
:meth:`FTF.similarity_pair` returns both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rsitr.data.types import CaptionDataset
from rsitr.losses.contrastive import info_nce, logit_scale_exp, symmetric_ce
from rsitr.losses.ftf import intra_granularity, intra_structure, token_mean
from rsitr.models.base import Backbone, Features
from rsitr.retrieval.interaction import DEFAULT_BALANCE, DEFAULT_TAU, fine_scores, interaction_scores
from rsitr.retrieval.twostage import DEFAULT_ALPHA, DEFAULT_K, TwoStageParams, exhaustive, rescore, two_stage
from rsitr.methods.base import Capabilities, CandidateScoring, Method, register_method
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

@dataclass
class FTFOptions:
    """FTF's options (see the module doc)."""

    # allowed values, checked when the options are read (rsitr.utils.config.check_declared_ranges)
    RANGES: ClassVar[dict] = {"coarse_weight": (0, None, False), "fine_weight": (0, None, False), "intra_weight": (0, None, False),
                              "fine_candidates": (2, None, False), "k": (1, None, False), "alpha": (0, 1, False), "tau": (0, None, True),
                              "balance": (0, 1, False), "chunk": (1, None, False)}
    FINITE: ClassVar[bool] = True

    coarse_weight: float = 1.0
    fine_weight: float = 1.0
    intra_weight: float = 0.5
    intra_mode: str = "granularity"  # granularity | structure | none
    fine_logit_scale: float | None = None  # None: the model's temperature; else a fixed log inverse temperature
    fine_candidates: int | None = None  # None: fine loss over the whole batch; k: over each query's k coarse-best in-batch candidates
    k: int = DEFAULT_K
    alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    balance: float = DEFAULT_BALANCE
    renorm: bool = True
    rerank: str = "two_stage"  # two_stage | exhaustive | none
    eval_direction: str = "t2i"  # t2i | i2t (the evaluator takes one matrix)
    index_kind: str = "flat"
    chunk: int = 1 << 22


INTRA_MODES = ("granularity", "structure", "none")
RERANKS = ("two_stage", "exhaustive", "none")


def _candidates(img: Features, txt: Features, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's ``k`` coarse-best in-batch images and each image's ``k`` best texts, the
    positive (pair ``i`` <-> ``i``) always first."""
    n = img.pooled.shape[0]
    with torch.no_grad():
        c = F.normalize(img.pooled.float(), dim=-1) @ F.normalize(txt.pooled.float(), dim=-1).t()  # [images, texts]
        c = c.masked_fill(torch.eye(n, dtype=torch.bool, device=c.device), float("inf"))
        return c.t().topk(k, dim=1).indices, c.topk(k, dim=1).indices  # [texts, k], [images, k]


def _directional(s: torch.Tensor, valid_src: torch.Tensor, gram: torch.Tensor, valid_q: torch.Tensor, tau: float, renorm: bool) -> torch.Tensor:
    """One direction of the interaction from gathered cosines ``s [Q, C, Nq, Ns]`` (query token x
    source token, per query and candidate pair): softmax over the valid source tokens, score
    ``<q, sum_s a_s x_s>`` (over ``|| sum_s a_s x_s ||`` with ``renorm``, from the source Gram
    matrices ``gram [Q, C, Ns, Ns]``), mean over the valid query tokens -> ``[Q, C]``."""
    logits = (s / tau).masked_fill(~valid_src[..., None, :], float("-inf"))
    a = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    num = (a * s).sum(-1)  # [Q, C, Nq]
    if renorm:
        norm2 = ((a @ gram) * a).sum(-1)
        num = num / norm2.clamp_min(1e-12).sqrt().clamp_min(1e-6)
    vq = valid_q.float()
    return (num * vq).sum(-1) / vq.sum(-1).clamp_min(1)


def candidate_fine_ce(img: Features, txt: Features, k: int, scale: torch.Tensor, *, tau: float = DEFAULT_TAU,
                      balance: float = DEFAULT_BALANCE, renorm: bool = True) -> torch.Tensor:
    """Cross-entropy of the fine scores over each query's ``k`` best in-batch candidates by
    coarse cosine, the positive always first; mean of both directions. Same scores as
    :func:`~rsitr.retrieval.interaction.interaction_scores` on the candidate pairs, computed from
    one word x patch cosine matrix of the whole batch (a single matrix product) and per-item Gram
    matrices, so the step costs little more than the coarse loss on a CPU."""
    n = img.pooled.shape[0]
    k = max(1, min(int(k), n))
    imgs_of_text, texts_of_img = _candidates(img, txt, k)
    p, w = F.normalize(img.tokens.float(), dim=-1), F.normalize(txt.tokens.float(), dim=-1)  # [n, Np, d], [n, Nw, d]
    mp, mw = img.mask.bool(), txt.mask.bool()
    n_p, n_w = p.shape[1], w.shape[1]
    s = (w.reshape(-1, w.shape[-1]) @ p.reshape(-1, p.shape[-1]).t()).view(n, n_w, n, n_p)  # [texts, Nw, images, Np]
    g_img = p @ p.transpose(1, 2) if renorm else None  # [n, Np, Np]
    g_txt = w @ w.transpose(1, 2) if renorm else None  # [n, Nw, Nw]
    losses = []
    target = torch.zeros(n, dtype=torch.long, device=s.device)
    # text queries over candidate images, and image queries over candidate texts
    s_t = s.permute(0, 2, 1, 3)  # [texts, images, Nw, Np]
    st2 = torch.gather(s_t, 1, imgs_of_text[:, :, None, None].expand(n, k, n_w, n_p))  # [texts, k, Nw, Np]
    s_i = s.permute(2, 0, 3, 1)  # [images, texts, Np, Nw]
    si2 = torch.gather(s_i, 1, texts_of_img[:, :, None, None].expand(n, k, n_p, n_w))  # [images, k, Np, Nw]
    for q_s, cand, q_is_text in ((st2, imgs_of_text, True), (si2, texts_of_img, False)):
        # the pair (query, candidate) score = balance * text->image + (1 - balance) * image->text
        if q_is_text:
            t2v = _directional(q_s, mp[cand], g_img[cand] if renorm else None, mw[:, None, :].expand(n, k, n_w), tau, renorm) if balance > 0 else 0.0
            v2t = _directional(q_s.transpose(-1, -2), mw[:, None, :].expand(n, k, n_w), g_txt[:, None].expand(n, k, n_w, n_w) if renorm else None,
                               mp[cand], tau, renorm) if balance < 1 else 0.0
        else:
            t2v = _directional(q_s.transpose(-1, -2), mp[:, None, :].expand(n, k, n_p), g_img[:, None].expand(n, k, n_p, n_p) if renorm else None,
                               mw[cand], tau, renorm) if balance > 0 else 0.0
            v2t = _directional(q_s, mw[cand], g_txt[cand] if renorm else None, mp[:, None, :].expand(n, k, n_p), tau, renorm) if balance < 1 else 0.0
        fine = balance * t2v + (1 - balance) * v2t
        losses.append(F.cross_entropy(scale * fine, target))
    return 0.5 * (losses[0] + losses[1])


def candidate_fine_ce_reference(img: Features, txt: Features, k: int, scale: torch.Tensor, **kw) -> torch.Tensor:
    """:func:`candidate_fine_ce` through :func:`interaction_scores` on gathered tokens (slow; the
    definition the fast version is tested against)."""
    n = img.pooled.shape[0]
    k = max(1, min(int(k), n))
    imgs_of_text, texts_of_img = _candidates(img, txt, k)
    s_t2i = interaction_scores(img.tokens[imgs_of_text], img.mask[imgs_of_text], txt.tokens[:, None], txt.mask[:, None], **kw)
    s_i2t = interaction_scores(img.tokens[:, None], img.mask[:, None], txt.tokens[texts_of_img], txt.mask[texts_of_img], **kw)
    target = torch.zeros(n, dtype=torch.long, device=s_t2i.device)
    return 0.5 * (F.cross_entropy(scale * s_t2i, target) + F.cross_entropy(scale * s_i2t, target))


@register_method
class FTF(Method):
    name = "ftf"
    label = "FTF"
    Options = FTFOptions
    contrastive_off = {"coarse_weight": 0.0}

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data: CaptionDataset | None):
        super().__init__(backbone, options, train_data)
        o = self.opts
        if o.intra_mode not in INTRA_MODES:
            raise RsitrError(f"FTF intra_mode must be one of {INTRA_MODES}, got {o.intra_mode!r}")
        if o.rerank not in RERANKS:
            raise RsitrError(f"FTF rerank must be one of {RERANKS}, got {o.rerank!r}")
        if o.eval_direction not in ("t2i", "i2t"):
            raise RsitrError(f"FTF eval_direction must be 't2i' or 'i2t', got {o.eval_direction!r}")
        if not 0 <= float(o.alpha) <= 1 or not 0 <= float(o.balance) <= 1 or float(o.tau) <= 0 or int(o.k) < 1:
            raise RsitrError(f"FTF: need 0 <= alpha, balance <= 1, tau > 0, k >= 1 (got alpha={o.alpha}, balance={o.balance}, "
                             f"tau={o.tau}, k={o.k})")
        if o.fine_candidates is not None and int(o.fine_candidates) < 2:
            raise RsitrError(f"FTF fine_candidates must be null or >= 2 (the positive and a negative), got {o.fine_candidates!r}")

    @property
    def capabilities(self) -> Capabilities:
        two = self.opts.rerank == "two_stage"
        fine = self.opts.rerank != "none"
        return Capabilities(two_stage=two, own_scoring=fine, train_tokens=True, score_tokens=fine)

    def two_stage_params(self) -> TwoStageParams | None:
        o = self.opts
        if o.rerank != "two_stage":
            return None
        return TwoStageParams(k=int(o.k), alpha=float(o.alpha), tau=float(o.tau), balance=float(o.balance), renorm=bool(o.renorm),
                              index_kind=str(o.index_kind))

    def score_direction(self) -> str | None:
        return str(self.opts.eval_direction)

    def candidate_scoring(self) -> CandidateScoring:
        """Search rescores as eval's text->image matrix does: ``two_stage``, the method's ``k``
        recalled candidates; ``exhaustive``, every candidate search hands over; ``none``: cosine."""
        o = self.opts
        if o.rerank == "none":
            return CandidateScoring()
        if o.rerank == "two_stage":
            return CandidateScoring("two_stage", needs_tokens=True, depth=int(o.k))
        return CandidateScoring("fine_mix", needs_tokens=True)

    @torch.no_grad()
    def rescore(self, coarse: torch.Tensor, query: Features, cand_tokens: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.rerank == "none":
            return coarse
        params = TwoStageParams(alpha=float(o.alpha), tau=float(o.tau), balance=float(o.balance), renorm=bool(o.renorm))
        return rescore(coarse, query.tokens, query.mask, cand_tokens, cand_mask, params)

    # -- training ------------------------------------------------------------------------------
    def _fine_kw(self) -> dict[str, Any]:
        o = self.opts
        return dict(tau=float(o.tau), balance=float(o.balance), renorm=bool(o.renorm))

    def loss(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.opts
        temp = self.temperature(backbone)
        logs: dict[str, float] = {}
        total = img.pooled.sum() * 0.0
        if float(o.coarse_weight) > 0:
            lc = info_nce(img.pooled, txt.pooled, temp, same=self.same_text(batch, img.pooled.shape[0]), positives=self.positives)
            total = total + float(o.coarse_weight) * lc
            logs["loss_coarse"] = float(lc.detach())
        if float(o.fine_weight) > 0 or (o.intra_mode != "none" and float(o.intra_weight) > 0):
            if img.tokens.dim() != 3 or txt.tokens.dim() != 3 or img.tokens.shape[1] == 0 or txt.tokens.shape[1] == 0:
                raise RsitrError("FTF needs token features for both modalities (the backbone/cache gave none)")
        if float(o.fine_weight) > 0:
            fscale = temp if o.fine_logit_scale is None else float(o.fine_logit_scale)
            k = o.fine_candidates
            if k is not None and int(k) < img.pooled.shape[0]:
                lf = candidate_fine_ce(img, txt, int(k), logit_scale_exp(fscale).to(img.pooled.device), **self._fine_kw())
            else:
                fs = fine_scores(img.tokens, img.mask, txt.tokens, txt.mask, chunk=int(o.chunk), **self._fine_kw())
                lf = symmetric_ce(logit_scale_exp(fscale).to(fs.device) * fs)
            total = total + float(o.fine_weight) * lf
            logs["loss_fine"] = float(lf.detach())
        if o.intra_mode != "none" and float(o.intra_weight) > 0:
            fn = intra_granularity if o.intra_mode == "granularity" else intra_structure
            li = 0.5 * (fn(img.pooled, token_mean(img), temp) + fn(txt.pooled, token_mean(txt), temp))
            total = total + float(o.intra_weight) * li
            logs["loss_intra"] = float(li.detach())
        logs["loss"] = float(total.detach())
        return total, logs

    # -- evaluation ------------------------------------------------------------------------------
    def _args(self, enc):
        if enc.image_features is None or enc.text_features is None:
            raise RsitrError("FTF reranking needs token features (encode with keep_tokens=True)")
        i, t = enc.image_features, enc.text_features
        return (enc.images, enc.texts, i.tokens, i.mask, t.tokens, t.mask)

    @torch.no_grad()
    def scores(self, enc, direction: str) -> torch.Tensor:
        """The ``[n_images, n_texts]`` matrix of the configured ``rerank`` for one direction."""
        o = self.opts
        if o.rerank == "none":
            return enc.images @ enc.texts.t()
        if o.rerank == "exhaustive":
            return exhaustive(*self._args(enc), alpha=float(o.alpha), chunk=int(o.chunk), **self._fine_kw())
        p = self.two_stage_params()  # the parameters search reranks with too
        return two_stage(*self._args(enc), k=p.k, alpha=p.alpha, direction=direction, index_kind=p.index_kind, tau=p.tau,
                         balance=p.balance, renorm=p.renorm)

    @torch.no_grad()
    def similarity_pair(self, backbone: Backbone, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t2i matrix, i2t matrix)``: rank texts->images with the first (column-wise) and
        images->texts with the second (row-wise)."""
        t2i = self.scores(enc, "t2i")
        i2t = t2i if self.opts.rerank != "two_stage" else self.scores(enc, "i2t")
        return self.rerank(t2i, "t2i"), self.rerank(i2t, "i2t")

    @torch.no_grad()
    def score(self, backbone: Backbone, enc) -> torch.Tensor:
        return self.scores(enc, str(self.opts.eval_direction))


__all__ = ["FTF", "FTFOptions", "candidate_fine_ce", "intra_granularity", "intra_structure", "symmetric_ce", "token_mean"]
