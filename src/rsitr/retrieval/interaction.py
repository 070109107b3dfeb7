"""FTF's parameter-free balanced text-guided interaction (Chen et al., "Fast-then-Fine", arXiv
2604.20429, rerank stage: "parameter-free balanced text-guided interaction block").

The paper describes the block as text-guided aggregation of patch tokens, balanced with the
reverse direction, with no learnable parameter. Our formulation (the exact equations are ours;
paper-silent choices are keyword arguments):

Let ``P [Np, d]`` be the L2-normalised patch tokens of an image (mask ``mp``), ``W [Nw, d]`` the
L2-normalised word tokens of a caption (mask ``mw``) and ``S = W P^T`` their cosines.

* text -> image (text-guided aggregation): each word attends over the valid patches,
  ``A = softmax_p(S / tau)``, aggregates ``v_w = sum_p A[w, p] P_p`` and is scored by
  ``cos(W_w, v_w)``; ``s_t2v`` = mean over valid words.
* image -> text (the reverse direction): each patch attends over the valid words,
  ``B = softmax_w(S^T / tau)``, ``t_p = sum_w B[p, w] W_w``, score ``cos(P_p, t_p)``;
  ``s_v2t`` = mean over valid patches.
* balanced: ``fine = balance * s_t2v + (1 - balance) * s_v2t``.

``tau`` (default 0.1) and ``balance`` (default 0.5) are paper-silent choices. ``renorm=False``
replaces the cosine with the un-normalised ``<W_w, v_w>`` (the attention-weighted mean cosine),
which is cheaper (only ``S`` is needed).

Every step is a softmax/sum/mean over patches, so the score does not depend on the order of the
patches (or of the words). Nothing here has a parameter. Norms of the aggregated vectors are
computed either explicitly (``A @ P``) or through the Gram matrix ``P P^T`` (``a^T G a``),
whichever costs fewer multiply-adds for the shapes at hand - the values are the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TAU = 0.1
DEFAULT_BALANCE = 0.5
DEFAULT_CHUNK = 1 << 22  # most elements of one [images, texts, words, patches] block


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if bool(valid.all()):  # no padding (image patches): skip the masking passes
        return torch.softmax(logits, dim=-1)
    a = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.nan_to_num(a, nan=0.0)  # rows without any valid entry -> all zero


def _agg_norm(att: torch.Tensor, att_valid_batch: torch.Size, src: torch.Tensor) -> torch.Tensor:
    """``|| att @ src ||`` per row, ``att [..., R, C]``, ``src [..., C, d]`` (broadcast)."""
    n_src = src.shape[:-2].numel()
    n_out = att.shape[:-2].numel()
    r, c, d = att.shape[-2], att.shape[-1], src.shape[-1]
    explicit = n_out * r * c * d
    gram = n_src * c * c * d + n_out * r * c * c
    if explicit <= gram:
        return torch.linalg.vector_norm(att @ src, dim=-1).clamp_min(1e-6)
    g = src @ src.transpose(-1, -2)
    n2 = ((att @ g) * att).sum(-1)
    return n2.clamp_min(1e-12).sqrt()


def interaction_scores(img_tokens: torch.Tensor, img_mask: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor, *,
                       tau: float = DEFAULT_TAU, balance: float = DEFAULT_BALANCE, renorm: bool = True,
                       normalize: bool = True) -> torch.Tensor:
    """Balanced interaction score of broadcastable batches: ``img_tokens [..., Np, d]`` with
    ``img_mask [..., Np]`` and ``txt_tokens [..., Nw, d]`` with ``txt_mask [..., Nw]``; returns the
    broadcast batch shape ``[...]``. ``normalize`` L2-normalises the tokens first (set False when
    they already are)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    p = img_tokens.float()
    w = txt_tokens.float()
    if normalize:
        p, w = F.normalize(p, dim=-1), F.normalize(w, dim=-1)
    mp, mw = img_mask.bool(), txt_mask.bool()
    s = w @ p.transpose(-1, -2)  # [..., Nw, Np] cosines
    out = None
    if balance > 0:  # text -> image: words aggregate patches
        a = _masked_softmax(s / tau, mp[..., None, :])
        num = (a * s).sum(-1)  # <w, v_w>
        per_word = num / _agg_norm(a, mp.shape, p) if renorm else num
        mw_b = mw.expand(per_word.shape)
        s_t2v = (per_word * mw_b).sum(-1) / mw_b.sum(-1).clamp_min(1)
        out = balance * s_t2v
    if balance < 1:  # image -> text: patches aggregate words
        st = s.transpose(-1, -2)  # [..., Np, Nw]
        b = _masked_softmax(st / tau, mw[..., None, :])
        num = (b * st).sum(-1)
        per_patch = num / _agg_norm(b, mw.shape, w) if renorm else num
        mp_b = mp.expand(per_patch.shape)
        s_v2t = (per_patch * mp_b).sum(-1) / mp_b.sum(-1).clamp_min(1)
        out = (1 - balance) * s_v2t if out is None else out + (1 - balance) * s_v2t
    return out


def fine_scores(img_tokens: torch.Tensor, img_mask: torch.Tensor | None, txt_tokens: torch.Tensor, txt_mask: torch.Tensor | None, *,
                tau: float = DEFAULT_TAU, balance: float = DEFAULT_BALANCE, renorm: bool = True, normalize: bool = True,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Pairwise fine scores ``[n_img, n_txt]`` of ``img_tokens [n_img, Np, d]`` x ``txt_tokens
    [n_txt, Nw, d]`` (masks default to all valid). Computed in blocks of at most ``chunk``
    ``(image, text, word, patch)`` elements so memory stays bounded; differentiable."""
    n_i, n_p, _ = img_tokens.shape
    n_t, n_w, _ = txt_tokens.shape
    if img_mask is None:
        img_mask = torch.ones(n_i, n_p, dtype=torch.bool, device=img_tokens.device)
    if txt_mask is None:
        txt_mask = torch.ones(n_t, n_w, dtype=torch.bool, device=txt_tokens.device)
    p = F.normalize(img_tokens.float(), dim=-1) if normalize else img_tokens.float()
    w = F.normalize(txt_tokens.float(), dim=-1) if normalize else txt_tokens.float()
    if not renorm:
        return _fine_plain(p, img_mask.bool(), w, txt_mask.bool(), tau=tau, balance=balance, chunk=chunk)
    per_pair = max(1, n_w * n_p)
    ct = max(1, min(n_t, int(chunk) // per_pair))
    ci = max(1, min(n_i, int(chunk) // (per_pair * ct)))
    rows = []
    for i0 in range(0, n_i, ci):
        pi, mi = p[i0 : i0 + ci, None], img_mask[i0 : i0 + ci, None]
        cols = [interaction_scores(pi, mi, w[None, t0 : t0 + ct], txt_mask[None, t0 : t0 + ct], tau=tau, balance=balance,
                                   renorm=renorm, normalize=False) for t0 in range(0, n_t, ct)]
        rows.append(torch.cat(cols, dim=1))
    if not rows:
        return p.new_zeros(n_i, n_t)
    return torch.cat(rows, dim=0)


def _fine_plain(p: torch.Tensor, mp: torch.Tensor, w: torch.Tensor, mw: torch.Tensor, *, tau: float, balance: float, chunk: int) -> torch.Tensor:
    """``renorm=False`` scores of every (image, text) pair from one cosine matrix per block of
    texts: ``S = W P^T`` as a single matrix product ``[texts x words, images x patches]`` (one
    BLAS call instead of a batch of small ones), then the two masked softmax-weighted means.
    Same values as :func:`interaction_scores` with ``renorm=False``; several times faster."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    n_i, n_p, d = p.shape
    n_t, n_w, _ = w.shape
    flat_p = p.reshape(n_i * n_p, d)
    ct = max(1, min(n_t, int(chunk) // max(1, n_w * n_i * n_p)))
    vp = mp[None, None]  # [1, 1, n_i, Np]
    mpf = mp.float()
    outs = []
    for t0 in range(0, n_t, ct):
        wt, mwt = w[t0 : t0 + ct], mw[t0 : t0 + ct]
        st = (wt.reshape(-1, d) @ flat_p.t()).reshape(wt.shape[0], n_w, n_i, n_p)  # [t, Nw, i, Np]
        out = st.new_zeros(wt.shape[0], n_i)
        if balance > 0:  # text -> image: each word over the patches of each image
            a = _masked_softmax(st / tau, vp.expand_as(st))
            per_word = (a * st).sum(-1)  # [t, Nw, i]
            mwb = mwt[:, :, None].float()
            out = out + balance * (per_word * mwb).sum(1) / mwb.sum(1).clamp_min(1)
        if balance < 1:  # image -> text: each patch over the words
            sw = st.permute(0, 2, 3, 1)  # [t, i, Np, Nw]
            b = _masked_softmax(sw / tau, mwt[:, None, None, :].expand_as(sw))
            per_patch = (b * sw).sum(-1)  # [t, i, Np]
            out = out + (1 - balance) * (per_patch * mpf[None]).sum(-1) / mpf.sum(-1).clamp_min(1)[None]
        outs.append(out)
    if not outs:
        return p.new_zeros(n_i, n_t)
    return torch.cat(outs, dim=0).t()


def fine_scores_paired(img_tokens: torch.Tensor, img_mask: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Scores of aligned batches (e.g. a query's candidates): ``img_tokens [..., Np, d]`` with
    ``txt_tokens [..., Nw, d]`` broadcast over the leading dims. Same keyword arguments as
    :func:`interaction_scores`."""
    return interaction_scores(img_tokens, img_mask, txt_tokens, txt_mask, **kwargs)


__all__ = ["DEFAULT_BALANCE", "DEFAULT_CHUNK", "DEFAULT_TAU", "fine_scores", "fine_scores_paired", "interaction_scores"]
