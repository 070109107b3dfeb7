"""iEBAKER's KER - Keyword Explicit Reasoning (``ker: true``).

A keyword vocabulary (:mod:`rsitr.methods.keywords`: object/scene nouns, counts, colours,
relations, size/shape attributes) is built from the training captions (``ker_vocab_size`` most
frequent, ``ker_min_count``) or read from ``ker_vocab_file`` (one word per line, e.g. iEBAKER's
``rsitmd_tag_vocab_512.txt``), and stored in the options as ``ker_vocab`` (a JSON list), so the
checkpoint carries it and the method is rebuilt without the data (a copy goes to
``<out_dir>/ker_vocab.txt`` for inspection). ``ker_mode``:

* ``swap`` (default): for each caption of the batch, ``ker_negatives`` hard negatives are made by
  swapping one keyword for another word of its group (colour->colour, count->count, left->right,
  car->ship...; never a listed synonym) - captions one key concept away. They are encoded with
  the backbone and the image must pick its true caption among them: cross-entropy over
  ``[s(v, t), s(v, t'_1), ...]`` at the method temperature, weight ``ker_weight``. *Our choice*
  (``ker_pool``, default 4): each caption gets a fixed pool of that many swaps, drawn once, and
  each epoch uses ``ker_negatives`` of them; with a frozen text trunk (the two-tower default,
  ``model.mode: heads``) the trunk features of the whole pool are computed once and each step
  costs only the text head - without it KER costs a text-tower forward of ``batch x
  ker_negatives`` captions per step (5-10x the step time on CPU). ``ker_pool: 0`` draws fresh
  swaps every epoch (``tokenize`` + ``text_features`` per step).
* ``mask``: the paper code's objective - one keyword of the caption is replaced by
  ``ker_mask_token`` and a small head predicts which vocabulary word it was from the image and the
  masked caption (``[v; t_masked; v * t_masked] -> MLP -> |vocab|``; the code uses a cross-modal
  transformer and predicts BPE tokens). ``both`` sums the two.
Swaps, pool choices and masks are drawn from ``numpy.random.default_rng([ker_seed, (epoch,)
text_index])``: the same negatives for the same caption in the same epoch whatever the batch, so a
resumed run is exact.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsitr.data.types import CaptionDataset
from rsitr.losses.contrastive import logit_scale_exp
from rsitr.methods.keywords import KeywordIndex, build_vocab, load_vocab
from rsitr.models.base import Backbone, Features
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


class KERMixin:
    """The keyword part of :class:`~rsitr.methods.iebaker.method.IEBAKER`: reads ``self.opts`` and
    the training captions ``self._texts``; holds the keyword index ``kw``, the mask head
    ``ker_head`` and the swap pools."""

    def _build_ker(self, backbone: Backbone, train_data: CaptionDataset | None) -> None:
        """The keyword vocabulary (derived from the data once, then carried by the options), its
        index and the mask-mode head."""
        o = self.opts
        self.kw: KeywordIndex | None = None
        if o.ker:
            if o.ker_vocab is None:
                if o.ker_vocab_file:
                    vocab = load_vocab(o.ker_vocab_file, int(o.ker_vocab_size))
                elif train_data is not None:
                    vocab = build_vocab(train_data.texts()[0], int(o.ker_vocab_size), int(o.ker_min_count))
                else:
                    raise RsitrError("iebaker: ker is on but the options carry no ker_vocab and there is no training data to build one from")
                if not vocab:
                    raise RsitrError("iebaker: the keyword vocabulary is empty (no caption word passed ker_min_count)")
                o.ker_vocab = list(vocab)  # carried by the options (the checkpoint), not written back into the caller's
                log.info("iebaker KER: %d keywords (%s)", len(vocab), o.ker_vocab_file or "built from the training captions")
            self.kw = KeywordIndex(list(o.ker_vocab))
        d = backbone.embed_dim
        if o.ker and o.ker_mode in ("mask", "both"):
            self.ker_head = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, len(self.kw)))
        else:
            self.ker_head = None
        self._pool: dict[int, list[str]] | None = None  # text index -> its fixed swaps (ker_pool > 0)
        self._pool_cache: dict[str, torch.Tensor] = {}  # swapped caption -> text-trunk pooled features

    def _draw_swaps(self, caption: str, rng: np.random.Generator, k: int) -> list[str]:
        """Up to ``k`` distinct one-keyword swaps of ``caption``."""
        assert self.kw is not None
        out: list[str] = []
        seen = {caption}
        for _ in range(3 * k):  # a few extra draws to find k distinct swaps
            got = self.kw.swap(caption, rng)
            if got is None:
                break
            if got[0] not in seen:
                seen.add(got[0])
                out.append(got[0])
                if len(out) == k:
                    break
        return out

    def _pool_of(self, t: int) -> list[str]:
        """The fixed swap pool of training caption ``t`` (``ker_pool`` > 0), drawn once."""
        if self._pool is None:
            self._pool = {}
        if t not in self._pool:
            assert self._texts is not None
            rng = np.random.default_rng([int(self.opts.ker_seed), int(t), 0x9001])
            self._pool[t] = self._draw_swaps(self._texts[t], rng, int(self.opts.ker_pool))
        return self._pool[t]

    def ker_negatives(self, texts: list[str], text_index: list[int], epoch: int) -> tuple[list[str], list[int]]:
        """The swapped-keyword hard negatives of a batch: ``(captions, row of their positive)``,
        up to ``ker_negatives`` distinct ones per caption, deterministic in (seed, epoch, caption):
        fresh swaps each epoch (``ker_pool: 0``) or a per-epoch choice from the caption's fixed
        pool of ``ker_pool`` swaps."""
        k = int(self.opts.ker_negatives)
        pool = int(self.opts.ker_pool)
        out, rows = [], []
        for r, (cap, ti) in enumerate(zip(texts, text_index)):
            rng = np.random.default_rng([int(self.opts.ker_seed), epoch, int(ti), 0x5A9])
            if pool > 0 and self._texts is not None and self._texts[int(ti)] == cap:
                cands = self._pool_of(int(ti))
                got = [cands[i] for i in sorted(rng.permutation(len(cands))[:k])]
            else:
                got = self._draw_swaps(cap, rng, k)
            out.extend(got)
            rows.extend([r] * len(got))
        return out, rows

    def _negative_features(self, backbone: Backbone, negs: list[str], device) -> torch.Tensor:
        """Pooled embeddings of the negatives. With a swap pool and a frozen text trunk that has a
        trunk/head split, the trunk outputs of the whole pool are computed once and cached, and
        each step only applies the (trainable) head; otherwise a text forward. A text trunk that ends
        below trained layers (two-tower top mode) gives token activations the head needs whole; they
        are not pooled here: a text forward then too."""
        from rsitr.models.trunk_cache import supports_trunk_cache

        cacheable = (int(self.opts.ker_pool) > 0 and supports_trunk_cache(backbone) and not backbone.trunk_trainable("text")
                     and backbone.trunk_cut("text") is None)
        if not cacheable:
            return backbone.text_features(backbone.tokenize(negs).to(device)).pooled
        missing = [c for c in dict.fromkeys(negs) if c not in self._pool_cache]
        if missing:
            if len(self._pool_cache) == 0 and self._texts is not None:  # first use: the whole pool in one go
                everything = [c for t in range(len(self._texts)) for c in self._pool_of(t)]
                missing = list(dict.fromkeys(everything + missing))
                log.info("iebaker KER: caching the text-trunk features of %d swapped captions", len(missing))
            was = backbone.training
            backbone.eval()
            with torch.no_grad():
                for i in range(0, len(missing), 256):
                    part = missing[i : i + 256]
                    pooled = backbone.text_trunk(backbone.tokenize(part).to(device)).pooled.float().cpu()
                    for c, f in zip(part, pooled):
                        self._pool_cache[c] = f
            backbone.train(was)
        pooled = torch.stack([self._pool_cache[c] for c in negs]).to(device)
        empty = pooled.new_zeros(pooled.shape[0], 0, pooled.shape[1])
        return backbone.text_head(Features(pooled, empty, torch.zeros(pooled.shape[0], 0, dtype=torch.bool, device=device))).pooled

    def _ker_swap_loss(self, backbone, v, t, texts, tidx, epoch, scale) -> torch.Tensor:
        negs, rows = self.ker_negatives(texts, tidx, epoch)
        if not negs:
            return v.sum() * 0.0
        dev = v.device
        z = self._negative_features(backbone, negs, dev)
        vn, tn, zn = F.normalize(v.float(), dim=-1), F.normalize(t.float(), dim=-1), F.normalize(z.float(), dim=-1)
        s = logit_scale_exp(scale, dev)
        rows_t = torch.as_tensor(rows, device=dev)
        k = int(self.opts.ker_negatives)
        slot, count = [], {}
        for r in rows:  # position of each negative among its caption's negatives
            slot.append(count.get(r, 0))
            count[r] = slot[-1] + 1
        slot_t = torch.as_tensor(slot, device=dev)
        neg = torch.zeros(v.shape[0], k, device=dev).index_put((rows_t, slot_t), (vn[rows_t] * zn).sum(-1))
        valid = torch.zeros(v.shape[0], k + 1, dtype=torch.bool, device=dev)
        valid[:, 0] = True
        valid[rows_t, slot_t + 1] = True
        has = valid[:, 1:].any(1)
        # mask after scaling: a -inf times the learnable temperature would give a NaN gradient
        logits = (s * torch.cat([(vn * tn).sum(-1, keepdim=True), neg], dim=1)).masked_fill(~valid, float("-inf"))[has]
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=dev))

    def _ker_mask_loss(self, backbone, v, texts, tidx, epoch) -> torch.Tensor:
        assert self.kw is not None and self.ker_head is not None
        masked, target, rows = [], [], []
        for r, (cap, ti) in enumerate(zip(texts, tidx)):
            rng = np.random.default_rng([int(self.opts.ker_seed), epoch, int(ti), 0x3A5])
            got = self.kw.mask(cap, rng, str(self.opts.ker_mask_token))
            if got is not None:
                masked.append(got[0])
                target.append(got[1])
                rows.append(r)
        if not masked:
            return v.sum() * 0.0 + sum(p.sum() for p in self.ker_head.parameters()) * 0.0
        dev = v.device
        z = backbone.text_features(backbone.tokenize(masked).to(dev)).pooled
        vn = F.normalize(v[torch.as_tensor(rows, device=dev)].float(), dim=-1)
        zn = F.normalize(z.float(), dim=-1)
        logits = self.ker_head(torch.cat([vn, zn, vn * zn], dim=-1))
        return F.cross_entropy(logits, torch.as_tensor(target, device=dev))
