"""Querybank normalisation (QB-Norm; Bogolin et al., "Cross Modal Retrieval with Querybank
Normalisation", CVPR 2022): a post-hoc correction of hubness, for any embedding model.

A *hub* is a gallery item that is the nearest neighbour of many queries (on RSICD: generic
captions such as "many buildings are around a green park"). QB-Norm estimates how "popular" each
gallery item is from a bank of queries that are *not* the evaluated ones -- here the training
split -- and divides it out:

* inverted softmax (their Eq. 2): ``s'(q, g) = exp(beta s(q, g)) / sum_b exp(beta s(b, g))``
  over the bank queries ``b``. Ranking a query's row by ``s'`` is ranking it by
  ``s(q, g) - z_g`` with ``z_g = logsumexp_b(beta s(b, g)) / beta`` (:func:`bank_normalizers`);
  this module keeps that form, so normalised scores stay on the cosine scale and matrices of
  several models can be summed.
* dynamic inverted softmax (their Eq. 4, ``dynamic=True``): a query is normalised only when
  its raw top-1 gallery item is in the *activation set* -- the gallery items that are the
  top-1 of at least one bank query (:func:`activation_set`); the other queries keep their
  raw scores.

Queries are independent: a query's scores depend on the bank and the gallery, never on the
other evaluated queries (unlike a dual softmax over the test queries, which this is not).
Both directions of the protocol are covered: text->image normalises every image by the bank
*captions*, image->text every caption by the bank *images*.
"""
from __future__ import annotations

import torch

from rsitr.retrieval.rerank import _as_tensor


def _rows(n: int, width: int, budget: int = 1 << 23) -> int:
    return max(1, min(n, budget // max(1, width)))


@torch.no_grad()
def bank_normalizers(gallery: torch.Tensor, bank: torch.Tensor, beta: float) -> torch.Tensor:
    """``z_g = logsumexp_b(beta <bank_b, gallery_g>) / beta`` for every gallery row (``[G]``).

    ``gallery`` ``[G, D]`` and ``bank`` ``[B, D]``: L2-normalised embeddings of the two
    modalities of one model (the bank are queries: captions for an image gallery). The bank
    is read in chunks, so a bank of any size fits in memory."""
    if beta <= 0:
        raise ValueError(f"QB-Norm beta must be > 0, got {beta}")
    if gallery.ndim != 2 or bank.ndim != 2 or gallery.shape[1] != bank.shape[1]:
        raise ValueError(f"gallery {tuple(gallery.shape)} and bank {tuple(bank.shape)} must be [N, D] with the same D")
    if bank.shape[0] == 0:
        raise ValueError("QB-Norm needs a non-empty query bank")
    g = gallery.float()
    acc = None
    step = _rows(bank.shape[0], g.shape[0])
    for i in range(0, bank.shape[0], step):
        part = torch.logsumexp(beta * (bank[i : i + step].float() @ g.t()), dim=0)
        acc = part if acc is None else torch.logaddexp(acc, part)
    return acc / beta


@torch.no_grad()
def activation_set(gallery: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Boolean ``[G]``: the gallery items that are the top-1 of at least one bank query."""
    active = torch.zeros(gallery.shape[0], dtype=torch.bool)
    g = gallery.float()
    step = _rows(bank.shape[0], g.shape[0])
    for i in range(0, bank.shape[0], step):
        active[(bank[i : i + step].float() @ g.t()).argmax(dim=1)] = True
    return active


def qb_norm(sim, image_norm: torch.Tensor, text_norm: torch.Tensor, image_active: torch.Tensor | None = None,
            text_active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(t2i, i2t)`` pair of matrices (``[images, texts]`` each, the protocol's layout) of
    ``sim`` normalised by the bank.

    ``image_norm`` ``[images]``: :func:`bank_normalizers` of the images by the bank captions (the
    text->image direction ranks a column); ``text_norm`` ``[texts]``: of the captions by the bank
    images (image->text ranks a row). With the activation sets (dynamic inverted softmax), a
    query whose raw top-1 is outside its gallery's set keeps its raw scores."""
    s = _as_tensor(sim).float()
    n, m = s.shape
    if image_norm.shape != (n,) or text_norm.shape != (m,):
        raise ValueError(f"normalisers {tuple(image_norm.shape)}/{tuple(text_norm.shape)} do not match the {n}x{m} matrix")
    t2i = s - image_norm.float()[:, None]
    i2t = s - text_norm.float()[None, :]
    if image_active is not None:  # text queries (columns) whose raw top-1 image is not a hub candidate
        raw = ~image_active[s.argmax(dim=0)]
        t2i[:, raw] = s[:, raw]
    if text_active is not None:  # image queries (rows) whose raw top-1 caption is not
        raw = ~text_active[s.argmax(dim=1)]
        i2t[raw, :] = s[raw, :]
    return t2i, i2t
