"""iEBAKER (Zhang et al., arXiv 2504.05644): Eliminate Before Align, Keyword Explicit Reasoning,
and Sort After Reversed retrieval, as ``method.name: iebaker``. Each part is switched on alone
(``eba``, ``ker``, ``sar``); with all three off the method is the baseline (symmetric InfoNCE on
the pooled embeddings with the learnable temperature).

EBA - Eliminate Before Align (``eba: true``)
--------------------------------------------
At the start of an epoch (:meth:`IEBAKER.epoch_pairs`) every training pair (image, caption) is
scored with the current weights (``ctx.encode()``: cosine of the pooled embeddings = *global*
similarity; with ``local: true`` also the token-level *local* similarity below). The weakest pairs
are eliminated by ``eba_criterion``:

* ``global_fraction`` (default): the ``eba_fraction`` lowest-scored pairs of the whole split
  (``floor(eba_fraction * n_pairs)``; ties by text index). The iEBAKER code drops the pairs below
  the ``dropratio`` quantile of recent positive-pair similarities (``--dropratio 0.01``), which is
  this criterion; ``eba_fraction`` defaults to that 0.01;
* ``per_image_fraction``: in each image, its ``floor(eba_fraction * n_captions)`` lowest captions;
* ``threshold``: every pair scoring below ``eba_threshold`` (``eba_threshold_local`` for the local
  score).

Then a guard: no image keeps fewer than ``eba_min_keep`` (default 1) captions - its best-scored
eliminated captions are restored - so the filter never drops every caption of an image (the
restored pairs are logged). Training continues on the kept pairs (the loop cycles them to keep
the number of steps of an epoch). The eliminated pairs are written (``eba_write``, default on),
with their scores, to ``<out_dir>/eba_epoch{N}.tsv`` (N = 1-based epoch; columns ``image_index image_id caption_index
text_index score_global score_local score dropped_from caption``).

The paper's two schemes (``eba_scheme``), "whether local and global similarity affect each other":

* ``joint`` (default; the code's default ``--eba-strategy joint``): one score decides for both
  losses - the global similarity, or with ``eba_joint_local_weight = a > 0`` the mix
  ``(1 - a) z(global) + a z(local)`` of the two z-scored similarities. Eliminated pairs leave the
  epoch.
* ``separate`` (the code's ``split``; needs ``local: true``): the global score eliminates pairs
  from the global loss and the local score from the local loss, each with its own criterion
  threshold. A pair eliminated by both leaves the epoch; a pair eliminated by one stays in the
  epoch and only that loss ignores it as a positive (it still serves as a negative, as in the code).
  The per-pair flags live in the buffer ``eba_drop`` (checkpointed, so a resumed run is exact).

When (``eba_warmup_epochs``, default 1): EBA starts after that many epochs of plain alignment and
re-scores every ``eba_every`` epochs (the flags of the last scoring apply in between). The paper's
code switches EBA on at epoch 4 of 7 (``--dropepoch 4``) with a continuously refreshed score
queue; with a pretrained backbone one epoch is enough for the scores to mean something, and the
option reproduces the code's schedule when set to 4. *Our choice*: score once per epoch on the
whole split (the hook's granularity) rather than per batch against a queue.

Local similarity (``local: true``; used by EBA's schemes and as an extra alignment loss)
-----------------------------------------------------------------------------------------
``local(v, t)`` = mean over the caption's valid word tokens of the best cosine with any image
token (patch / spatial position) - a token-level alignment. *Our choice*: the code uses the
Frobenius norm of the token-token cosine matrix, which grows with caption length and counts
padding; the max-mean form is length-normalised. Loss: symmetric in-batch cross-entropy over
``local_scale * local`` (``local_scale`` 20 ~ the code's fixed ``exp(2.996)``), weight
``local_weight``. At evaluation the score is ``(1 - w) global + w local`` with
``w = local_eval_weight`` (0.4, the code's 0.6/0.4 mix); set it to 0 to rank by global only.

KER - Keyword Explicit Reasoning (``ker: true``)
------------------------------------------------
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

SAR - Sort After Reversed retrieval (``sar: true`` or ``rerank: sar``)
--------------------------------------------------------------------
:meth:`IEBAKER.similarity` re-scores the evaluation matrix with :func:`rsitr.retrieval.rerank.sar`
(top ``sar_k`` candidates of each query re-sorted by their reverse rank; ``sar_k_t2i``/``sar_k_i2t``
override per direction; ``sar_reverse_weight``; ``sar_direction``). The option is read at call
time, so ``method.opts.rerank = "sar"`` switches it on for a loaded checkpoint.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsitr.data.types import CaptionDataset
from rsitr.losses.contrastive import logit_scale_exp, symmetric_ce
from rsitr.losses.iebaker import masked_info_nce
from rsitr.methods.keywords import KeywordIndex, build_vocab, load_vocab, save_vocab
from rsitr.models.base import Backbone, Features
from rsitr.utils.distributed import gather_rows
from rsitr.methods.base import Capabilities, Method, TrainContext, register_method
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

@dataclass
class IEBAKEROptions:
    """iEBAKER's options (see the module doc)."""

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


CRITERIA = ("global_fraction", "per_image_fraction", "threshold")


# -- pure helpers (tested directly) ---------------------------------------------------------------
def local_similarity(txt_tokens: torch.Tensor, txt_mask: torch.Tensor, img_tokens: torch.Tensor, img_mask: torch.Tensor, *, pairwise: bool = True) -> torch.Tensor:
    """Max-mean token alignment: for each valid word token its best cosine with a valid image
    token, averaged over the word tokens. ``pairwise``: ``[n_texts, n_images]`` for every pair;
    else ``[n]`` for the matched rows."""
    t = F.normalize(txt_tokens.float(), dim=-1)
    v = F.normalize(img_tokens.float(), dim=-1)
    tm = txt_mask.to(t.dtype)
    neg = torch.finfo(t.dtype).min
    if pairwise:
        s = torch.einsum("atd,bvd->abtv", t, v)
        s = s.masked_fill(~img_mask.bool()[None, :, None, :], neg).amax(-1)  # [a, b, t]
        return (s * tm[:, None, :]).sum(-1) / tm.sum(-1).clamp(min=1.0)[:, None]
    s = torch.einsum("ntd,nvd->ntv", t, v)
    s = s.masked_fill(~img_mask.bool()[:, None, :], neg).amax(-1)  # [n, t]
    return (s * tm).sum(-1) / tm.sum(-1).clamp(min=1.0)


def local_similarity_matrix(img: Features, txt: Features, budget: int = 1 << 24) -> torch.Tensor:
    """``[n_images, n_texts]`` local similarity of two encoded sets, in text blocks of bounded size."""
    n_img, n_i_tok = img.tokens.shape[:2]
    n_txt, n_t_tok = txt.tokens.shape[:2]
    step = max(1, budget // max(1, n_img * n_i_tok * max(1, n_t_tok)))
    out = torch.empty(n_img, n_txt)
    for j in range(0, n_txt, step):
        out[:, j : j + step] = local_similarity(txt.tokens[j : j + step], txt.mask[j : j + step], img.tokens, img.mask).t()
    return out


def eliminate(
    scores: np.ndarray,
    owner: np.ndarray,
    criterion: str,
    *,
    fraction: float = 0.0,
    threshold: float = 0.0,
    min_keep: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """EBA's filter over all training pairs. ``scores[t]`` is pair t's score, ``owner[t]`` its
    image. Returns ``(eliminated, restored)`` boolean arrays: the pairs the criterion selects
    minus those restored so that every image keeps ``min(min_keep, its caption count)`` captions
    (its best-scored ones); ``restored`` marks the pairs the guard put back."""
    scores = np.asarray(scores, dtype=np.float64)
    owner = np.asarray(owner, dtype=np.int64)
    n = len(scores)
    if scores.shape != owner.shape:
        raise ValueError(f"scores and owner differ in shape: {scores.shape} vs {owner.shape}")
    drop = np.zeros(n, dtype=bool)
    if criterion == "global_fraction":
        if not 0.0 <= fraction <= 1.0:
            raise RsitrError(f"eba_fraction must be in [0, 1], got {fraction}")
        k = int(np.floor(fraction * n + 1e-9))
        drop[np.lexsort((np.arange(n), scores))[:k]] = True
    elif criterion == "per_image_fraction":
        if not 0.0 <= fraction <= 1.0:
            raise RsitrError(f"eba_fraction must be in [0, 1], got {fraction}")
        order = np.lexsort((np.arange(n), scores, owner))  # by image, then score, then index
        starts = np.r_[0, np.flatnonzero(np.diff(owner[order])) + 1]
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends):
            k = int(np.floor(fraction * (e - s) + 1e-9))
            drop[order[s : s + k]] = True
    elif criterion == "threshold":
        drop = scores < threshold
    else:
        raise RsitrError(f"unknown eba_criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    restored = np.zeros(n, dtype=bool)
    if min_keep > 0 and drop.any():
        counts = np.bincount(owner, minlength=int(owner.max()) + 1)
        kept = np.bincount(owner[~drop], minlength=len(counts))
        need = np.minimum(min_keep, counts) - kept
        for img in np.flatnonzero(need > 0):
            cand = np.flatnonzero((owner == img) & drop)
            best = cand[np.lexsort((cand, -scores[cand]))][: need[img]]
            restored[best] = True
        drop &= ~restored
    return drop, restored


@register_method
class IEBAKER(Method):
    name = "iebaker"
    label = "iebaker"
    Options = IEBAKEROptions

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data: CaptionDataset | None):
        super().__init__(backbone, options, train_data)
        o = self.opts
        self._validate(o)

        # KER vocabulary: derived from the data once, then carried by the options
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

        # EBA per-pair flags (bit 0: out of the global loss, bit 1: out of the local loss) of the
        # last scoring, and the epoch of that scoring (-1: none yet)
        n_caps = train_data.n_captions if train_data is not None else 0
        self.register_buffer("eba_drop", torch.zeros(n_caps, dtype=torch.uint8))
        self.register_buffer("eba_epoch", torch.tensor(-1, dtype=torch.long))
        self._texts: list[str] | None = train_data.texts()[0] if train_data is not None else None
        self._pool: dict[int, list[str]] | None = None  # text index -> its fixed swaps (ker_pool > 0)
        self._pool_cache: dict[str, torch.Tensor] = {}  # swapped caption -> text-trunk pooled features

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
    def sar_enabled(self) -> bool:
        return bool(self.opts.sar) or self.opts.rerank == "sar"

    @property
    def capabilities(self) -> Capabilities:
        o = self.opts
        local_scoring = bool(o.local) and float(o.local_eval_weight) > 0
        return Capabilities(reranker="sar" if self.sar_enabled else None, own_scoring=local_scoring, train_tokens=bool(o.local),
                            score_tokens=local_scoring)

    def _eba_active(self, epoch: int) -> bool:
        return bool(self.opts.eba) and epoch >= int(self.opts.eba_warmup_epochs)

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
        from rsitr.data.imagesets import supports_trunk_cache, trunk_cut

        cacheable = (int(self.opts.ker_pool) > 0 and supports_trunk_cache(backbone) and not backbone.trunk_trainable("text")
                     and trunk_cut(backbone, "text") is None)
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

    # -- EBA -------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, img: Features, txt: Features, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Global (and local when ``local``) similarity of every training pair (text order)."""
        own = torch.as_tensor(owner, dtype=torch.long)
        g = (F.normalize(img.pooled.float(), dim=-1)[own] * F.normalize(txt.pooled.float(), dim=-1)).sum(-1).numpy()
        loc = None
        if self.opts.local:
            parts = []
            for s in range(0, len(own), 256):
                o = own[s : s + 256]
                parts.append(local_similarity(txt.tokens[s : s + 256], txt.mask[s : s + 256], img.tokens[o], img.mask[o], pairwise=False))
            loc = torch.cat(parts).numpy()
        return g.astype(np.float64), None if loc is None else loc.astype(np.float64)

    def select_pairs(self, g: np.ndarray, loc: np.ndarray | None, owner: np.ndarray) -> dict[str, np.ndarray]:
        """Apply the criterion and scheme: ``{"global", "local"}`` elimination masks (per text),
        the ``score`` that decided (joint) and the guard's ``restored`` pairs."""
        o = self.opts
        kw = dict(fraction=float(o.eba_fraction), min_keep=int(o.eba_min_keep))
        if o.eba_scheme == "joint":
            score = g
            a = float(o.eba_joint_local_weight)
            if loc is not None and a > 0:
                score = (1 - a) * _z(g) + a * _z(loc)
            drop, restored = eliminate(score, owner, o.eba_criterion, threshold=float(o.eba_threshold), **kw)
            return {"global": drop, "local": drop.copy(), "score": score, "restored": restored}
        assert loc is not None
        dg, rg = eliminate(g, owner, o.eba_criterion, threshold=float(o.eba_threshold), **kw)
        dl, rl = eliminate(loc, owner, o.eba_criterion, threshold=float(o.eba_threshold_local), **kw)
        return {"global": dg, "local": dl, "score": g, "restored": rg | rl}

    def epoch_pairs(self, order: np.ndarray, epoch: int, ctx: TrainContext) -> np.ndarray:
        o = self.opts
        if self.kw is not None and _is_main():
            vocab_path = Path(ctx.out_dir) / "ker_vocab.txt"
            if not vocab_path.exists():  # for inspection; the checkpoint carries it in the options
                save_vocab(self.kw.vocab, vocab_path)
        if not self._eba_active(epoch):
            return order
        data = ctx.train_data
        offsets = np.cumsum([0] + [len(e.captions) for e in data.entries])
        texts, owner_l = data.texts()
        owner = np.asarray(owner_l, dtype=np.int64)
        warm = int(o.eba_warmup_epochs)
        rescore = (epoch - warm) % int(o.eba_every) == 0 or int(self.eba_epoch) < 0
        if rescore:
            img, txt = ctx.encode()
            g, loc = self.score_pairs(img, txt, owner)
            sel = self.select_pairs(g, loc, owner)
            flags = sel["global"].astype(np.uint8) | (sel["local"].astype(np.uint8) << 1)
            if self.eba_drop.numel() != len(flags):
                self.eba_drop = torch.zeros(len(flags), dtype=torch.uint8, device=self.eba_drop.device)
            self.eba_drop.copy_(torch.from_numpy(flags))
            self.eba_epoch.fill_(epoch)
            n_out = int((flags == 3).sum())
            log.info("EBA epoch %d: %d of %d pairs eliminated (%d from the global loss only, %d from the local loss only); guard restored %d",
                     epoch + 1, n_out, len(flags), int((flags == 1).sum()), int((flags == 2).sum()), int(sel["restored"].sum()))
            if o.eba_write and _is_main():
                self._write_eliminated(Path(ctx.out_dir) / f"eba_epoch{epoch + 1}.tsv", data, texts, owner, offsets, g, loc, sel["score"], flags)
        flags_t = self.eba_drop.cpu().numpy()
        text_of = offsets[order[:, 0]] + order[:, 1]
        keep = flags_t[text_of] != 3
        return order[keep]

    def _write_eliminated(self, path: Path, data, texts, owner, offsets, g, loc, score, flags) -> None:
        from rsitr.utils.io import atomic_write_text

        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t", lineterminator="\n")
        w.writerow(["image_index", "image_id", "caption_index", "text_index", "score_global", "score_local", "score", "dropped_from", "caption"])
        what = {1: "global", 2: "local", 3: "all"}
        for t in np.flatnonzero(flags):
            i = int(owner[t])
            w.writerow([i, data.entries[i].image_id, int(t - offsets[i]), int(t), f"{g[t]:.6f}", "" if loc is None else f"{loc[t]:.6f}",
                        f"{score[t]:.6f}", what[int(flags[t])], texts[t]])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, buf.getvalue())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the flags are sized by the training split; a method rebuilt without data takes the saved size
        key = prefix + "eba_drop"
        if key in state_dict and state_dict[key].shape != self.eba_drop.shape:
            self.eba_drop = torch.zeros_like(state_dict[key], device=self.eba_drop.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

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

    @torch.no_grad()
    def rerank(self, sim: torch.Tensor, direction: str | None = None) -> torch.Tensor:
        """SAR when it is on. ``direction`` None: ``sar_direction`` with the per-direction depths;
        ``"t2i"`` / ``"i2t"`` (a matrix meaningful in that direction only, e.g. FTF's in ``combo``):
        that direction, its depth (``sar_k_t2i`` / ``sar_k_i2t``, else ``sar_k``) used for both
        candidate lists, *our choice*."""
        if not self.sar_enabled:
            return sim
        from rsitr.retrieval.rerank import sar

        o = self.opts
        if direction is None:
            return sar(sim, k=int(o.sar_k), k_t2i=o.sar_k_t2i, k_i2t=o.sar_k_i2t, reverse_weight=float(o.sar_reverse_weight),
                       direction=o.sar_direction)
        k = o.sar_k_t2i if direction == "t2i" else o.sar_k_i2t
        return sar(sim, k=int(k if k is not None else o.sar_k), direction=direction, reverse_weight=float(o.sar_reverse_weight))


# -- small utilities ---------------------------------------------------------------------------
def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - float(x.mean())) / (sd if sd > 0 else 1.0)


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _local_rows(n_total: int, n_local: int) -> tuple[int, int]:
    """Rows of this process's own pairs in (possibly all-gathered) batch features."""
    if n_total == n_local:
        return 0, n_local
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank * n_local, (rank + 1) * n_local
