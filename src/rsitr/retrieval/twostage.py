"""FTF two-stage retrieval (Chen et al., arXiv 2604.20429): text-agnostic recall over the pooled
("coarse") embeddings with a :class:`~rsitr.retrieval.index.VectorIndex`, then a text-guided
rerank of the top ``k`` candidates with the parameter-free interaction of
:mod:`rsitr.retrieval.interaction`.

Final score of a candidate (our choice; the paper reranks by the fine score, a mix keeps the
recall stage's evidence): ``final = (1 - alpha) * coarse + alpha * fine`` (``alpha`` default 0.5;
``alpha=1`` ranks candidates by the fine score alone). Both scores are cosines in [-1, 1].

In the full-matrix form (:func:`two_stage`, for the evaluation protocol) a non-candidate keeps
``coarse - offset`` (``offset`` = 4, larger than the spread of any final score) - so every
candidate ranks above every non-candidate and the non-candidates keep the recall order, and
recall@K beyond ``k`` is the coarse ranking's.

Directions: ``"t2i"`` - each caption recalls ``k`` images and reranks them (column-wise
meaningful); ``"i2t"`` - each image recalls ``k`` captions and reranks them with the same
interaction (row-wise meaningful). With ``k >= n`` candidates the result equals exhaustive
scoring ``(1 - alpha) * coarse + alpha * fine_scores(...)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rsitr.retrieval.index import TokenStore, VectorIndex
from rsitr.retrieval.interaction import DEFAULT_BALANCE, DEFAULT_TAU, fine_scores, fine_scores_paired

log = logging.getLogger(__name__)

DEFAULT_K = 100
DEFAULT_ALPHA = 0.5
OFFSET = 4.0
DIRECTIONS = ("t2i", "i2t")
BLOCK = 1 << 22  # most (query, candidate, word, patch) elements per rerank block


@dataclass(frozen=True)
class TwoStageParams:
    """How a two-stage scorer recalls and reranks: ``k`` candidates, ``final = (1 - alpha) coarse +
    alpha fine``, the interaction's ``tau`` / ``balance`` / ``renorm``, the recall index kind. A
    method with two-stage scoring (FTF) hands its trained values to evaluation and search alike."""

    k: int = DEFAULT_K
    alpha: float = DEFAULT_ALPHA
    tau: float = DEFAULT_TAU
    balance: float = DEFAULT_BALANCE
    renorm: bool = True
    index_kind: str = "flat"


def combine(coarse: torch.Tensor, fine: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * coarse + alpha * fine``."""
    return (1.0 - alpha) * coarse + alpha * fine


def _index_over(x: torch.Tensor, kind: str, index_kwargs: dict | None) -> VectorIndex:
    ix = VectorIndex(x.shape[1], kind, **(index_kwargs or {}))
    ix.add(x.detach().cpu().float().numpy())
    return ix


def two_stage(coarse_img: torch.Tensor, coarse_txt: torch.Tensor, img_tokens: torch.Tensor, img_mask: torch.Tensor | None,
              txt_tokens: torch.Tensor, txt_mask: torch.Tensor | None, *, k: int = DEFAULT_K, alpha: float = DEFAULT_ALPHA,
              direction: str = "t2i", tau: float = DEFAULT_TAU, balance: float = DEFAULT_BALANCE, renorm: bool = True,
              index_kind: str = "flat", index_kwargs: dict | None = None, offset: float = OFFSET, block: int = BLOCK) -> torch.Tensor:
    """Two-stage score matrix ``[N images, M texts]`` (see the module docstring).

    ``coarse_img [N, d]`` / ``coarse_txt [M, d]`` pooled embeddings (normalised here);
    ``img_tokens [N, Np, d]`` / ``txt_tokens [M, Nw, d]`` with masks (None = all valid).
    ``direction`` ``"t2i"``: captions are queries over an index of images; ``"i2t"``: images are
    queries over an index of captions. ``index_kind``/``index_kwargs`` pick the recall index."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ci = F.normalize(coarse_img.detach().float().cpu(), dim=-1)
    ct = F.normalize(coarse_txt.detach().float().cpu(), dim=-1)
    n, m = ci.shape[0], ct.shape[0]
    it = F.normalize(img_tokens.detach().float().cpu(), dim=-1)
    tt = F.normalize(txt_tokens.detach().float().cpu(), dim=-1)
    im = torch.ones(it.shape[:2], dtype=torch.bool) if img_mask is None else img_mask.detach().cpu().bool()
    tm = torch.ones(tt.shape[:2], dtype=torch.bool) if txt_mask is None else txt_mask.detach().cpu().bool()
    coarse = ci @ ct.t()
    out = coarse - offset
    kw = dict(tau=tau, balance=balance, renorm=renorm, normalize=False)
    if direction == "t2i":  # queries: texts (columns); candidates: images
        ix = _index_over(ci, index_kind, index_kwargs)
        kk = min(int(k), n)
        per_q = max(1, kk * it.shape[1] * max(tt.shape[1], it.shape[2]))  # gathered tokens and S
        qb = max(1, block // per_q)
        for q0 in range(0, m, qb):
            _, ids = ix.search(ct[q0 : q0 + qb].numpy(), kk)
            ids_t = torch.from_numpy(ids)
            valid = ids_t >= 0
            safe = ids_t.clamp_min(0)
            f = fine_scores_paired(it[safe], im[safe], tt[q0 : q0 + qb, None], tm[q0 : q0 + qb, None], **kw)  # [q, kk]
            q_idx = torch.arange(q0, q0 + ids.shape[0])[:, None].expand_as(safe)
            c = coarse[safe, q_idx]
            out[safe[valid], q_idx[valid]] = combine(c, f, alpha)[valid]
    else:  # queries: images (rows); candidates: texts
        ix = _index_over(ct, index_kind, index_kwargs)
        kk = min(int(k), m)
        per_q = max(1, kk * tt.shape[1] * max(it.shape[1], tt.shape[2]))
        qb = max(1, block // per_q)
        for q0 in range(0, n, qb):
            _, ids = ix.search(ci[q0 : q0 + qb].numpy(), kk)
            ids_t = torch.from_numpy(ids)
            valid = ids_t >= 0
            safe = ids_t.clamp_min(0)
            f = fine_scores_paired(it[q0 : q0 + qb, None], im[q0 : q0 + qb, None], tt[safe], tm[safe], **kw)
            q_idx = torch.arange(q0, q0 + ids.shape[0])[:, None].expand_as(safe)
            c = coarse[q_idx, safe]
            out[q_idx[valid], safe[valid]] = combine(c, f, alpha)[valid]
    return out


def exhaustive(coarse_img: torch.Tensor, coarse_txt: torch.Tensor, img_tokens: torch.Tensor, img_mask: torch.Tensor | None,
               txt_tokens: torch.Tensor, txt_mask: torch.Tensor | None, *, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU,
               balance: float = DEFAULT_BALANCE, renorm: bool = True, chunk: int = BLOCK) -> torch.Tensor:
    """Every pair scored: ``(1 - alpha) * coarse + alpha * fine`` ``[N, M]`` (the reference the
    two-stage form equals when ``k`` covers everything)."""
    ci = F.normalize(coarse_img.detach().float().cpu(), dim=-1)
    ct = F.normalize(coarse_txt.detach().float().cpu(), dim=-1)
    f = fine_scores(img_tokens.detach().cpu(), None if img_mask is None else img_mask.cpu(), txt_tokens.detach().cpu(),
                    None if txt_mask is None else txt_mask.cpu(), tau=tau, balance=balance, renorm=renorm, chunk=chunk)
    return combine(ci @ ct.t(), f, alpha)


# -- query-time search over an archive (index + token store) ------------------------------------
def rescore(coarse: torch.Tensor, query_tokens: torch.Tensor, query_mask: torch.Tensor | None, cand_tokens: torch.Tensor,
            cand_mask: torch.Tensor | None, params: TwoStageParams) -> torch.Tensor:
    """The rerank stage for ``b`` queries' ``k`` recalled candidates: ``(1 - alpha) coarse + alpha
    fine`` ``[b, k]`` from ``coarse [b, k]``, the queries' word tokens ``[b, Nw, d]`` and the
    candidates' patch tokens ``[b, k, Np, d]`` (masks None: all valid), with ``params``'s
    interaction settings -- the numbers :func:`two_stage` puts in the candidates' cells."""
    qm = None if query_mask is None else query_mask[:, None]
    f = fine_scores_paired(cand_tokens.float(), cand_mask, query_tokens.float()[:, None], qm, tau=params.tau, balance=params.balance,
                           renorm=params.renorm)
    return combine(coarse.float(), f, params.alpha)


def search_t2i(index: VectorIndex, store: TokenStore, query_pooled: Any, query_tokens: torch.Tensor, query_mask: torch.Tensor | None,
               *, k: int = DEFAULT_K, top: int | None = None, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU,
               balance: float = DEFAULT_BALANCE, renorm: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Text -> image two-stage search of ``b`` queries over an archive: recall ``k`` images per
    query from ``index`` (pooled image embeddings, same ids as ``store``), rerank them with their
    stored tokens. Returns ``(scores [b, top], ids [b, top], parts)`` best first (``top`` defaults
    to ``k``), ``parts`` holding the ``coarse`` and ``fine`` scores in the same order. Ids of
    missing recall hits (approximate indexes) are -1 with score -inf."""
    q = query_pooled.detach().cpu().float().numpy() if isinstance(query_pooled, torch.Tensor) else np.asarray(query_pooled, np.float32)
    if q.ndim == 1:
        q = q[None]
    cs, ids = index.search(q, k)
    qt = query_tokens.detach().cpu().float()
    if qt.dim() == 2:
        qt = qt[None]
    qm = torch.ones(qt.shape[:2], dtype=torch.bool) if query_mask is None else query_mask.detach().cpu().bool().reshape(qt.shape[:2])
    valid = ids >= 0
    toks, mask = store.get(np.where(valid, ids, 0))  # [b, k, T, d]
    f = fine_scores_paired(toks, mask, qt[:, None], qm[:, None], tau=tau, balance=balance, renorm=renorm).numpy()
    final = combine(torch.from_numpy(cs), torch.from_numpy(f), alpha).numpy()
    final[~valid] = -np.inf
    order = np.argsort(-final, axis=1, kind="stable")[:, : (top or ids.shape[1])]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(final).astype(np.float32), take(ids), {"coarse": take(cs), "fine": take(f.astype(np.float32))}


__all__ = ["DEFAULT_ALPHA", "DEFAULT_K", "DIRECTIONS", "OFFSET", "TwoStageParams", "combine", "exhaustive", "rescore", "search_t2i",
           "two_stage"]
