"""iEBAKER's EBA - Eliminate Before Align (``eba: true``).

At the start of an epoch (:meth:`IEBAKER.epoch_pairs`) every training pair (image, caption) is
scored with the current weights (``ctx.encode()``: cosine of the pooled embeddings = *global*
similarity; with ``local: true`` also the token-level *local* similarity of
:mod:`rsitr.methods.iebaker.local`). The weakest pairs are eliminated by ``eba_criterion``:

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
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsitr.methods.base import TrainContext
from rsitr.methods.iebaker.local import local_similarity
from rsitr.models.base import Features
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

CRITERIA = ("global_fraction", "per_image_fraction", "threshold")


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


class EBAMixin:
    """The elimination part of :class:`~rsitr.methods.iebaker.method.IEBAKER`: reads ``self.opts``,
    keeps its per-pair flags in the buffers ``eba_drop`` and ``eba_epoch``."""

    def _eba_active(self, epoch: int) -> bool:
        return bool(self.opts.eba) and epoch >= int(self.opts.eba_warmup_epochs)

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

    def _eliminate_before_align(self, order: np.ndarray, epoch: int, ctx: TrainContext) -> np.ndarray:
        """The epoch's pairs without those both losses eliminated (re-scored when due)."""
        o = self.opts
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


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - float(x.mean())) / (sd if sd > 0 else 1.0)


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
