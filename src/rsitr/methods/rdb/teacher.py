"""The teacher of RDB's consistency term (DTCL; ``teacher``, ``ema_momentum``, ``bank_momentum``,
see :mod:`rsitr.methods.rdb.method`): an EMA copy of the adapters swapped into the slots for a
second, gradient-free forward, or the cheap per-sample embedding bank.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.methods.adapters import frozen_copy
from rsitr.models.base import Backbone, Features
from rsitr.utils.distributed import gather_rows
from rsitr.utils.errors import RsitrError


class TeacherMixin:
    """The teacher part of :class:`~rsitr.methods.rdb.method.RDB`: reads ``self.opts``, the
    adapters and their slots (``_owners``); holds ``vea_teacher`` / ``tsa_teacher`` (EMA) or the
    banks."""

    def _build_teacher(self, backbone: Backbone, train_data) -> None:
        o = self.opts
        self.vea_teacher = self.tsa_teacher = None
        if "consistency" in self.terms and o.teacher == "ema":
            self.vea_teacher = nn.ModuleList(frozen_copy(m) for m in self.vea)
            self.tsa_teacher = nn.ModuleList(frozen_copy(m) for m in self.tsa)
        if "consistency" in self.terms and o.teacher == "bank":
            n_img = len(train_data) if train_data is not None else 0
            n_txt = len(train_data.texts()[0]) if train_data is not None else 0
            d = backbone.embed_dim
            self.register_buffer("bank_image", torch.zeros(n_img, d), persistent=False)
            self.register_buffer("bank_text", torch.zeros(n_txt, d), persistent=False)
            self.register_buffer("bank_image_seen", torch.zeros(n_img, dtype=torch.bool), persistent=False)
            self.register_buffer("bank_text_seen", torch.zeros(n_txt, dtype=torch.bool), persistent=False)

    @contextlib.contextmanager
    def _teacher_installed(self) -> Iterator[None]:
        try:
            for owner, _, teacher in self._owners:
                owner.adapter = teacher
            yield
        finally:
            for owner, student, _ in self._owners:
                owner.adapter = student

    @torch.no_grad()
    def _teacher_embeddings(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.opts.teacher == "bank":
            return self._bank_embeddings(img, txt, batch)
        have_img, have_txt = bool(len(self.vea)), bool(len(self.tsa))
        t_img, t_txt = img.pooled.detach(), txt.pooled.detach()  # a tower without adapters: teacher = student
        was = backbone.training
        backbone.eval()
        try:
            with self._teacher_installed():
                if have_img:
                    t_img = _tower_forward(backbone, batch, "image", img.pooled.shape[0])
                if have_txt:
                    t_txt = _tower_forward(backbone, batch, "text", txt.pooled.shape[0])
        finally:
            backbone.train(was)
        return t_img, t_txt

    def _bank_embeddings(self, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        m = float(self.opts.bank_momentum)
        out = []
        for feats, key, bank, seen in ((img, "image_index", self.bank_image, self.bank_image_seen),
                                       (txt, "text_index", self.bank_text, self.bank_text_seen)):
            idx = batch[key]
            if idx.shape[0] != feats.pooled.shape[0]:
                idx = gather_rows(idx)
            if bank.shape[0] == 0 or int(idx.max()) >= bank.shape[0]:
                raise RsitrError("RDB teacher 'bank' needs the training data at construction (banks sized by it)")
            cur = F.normalize(feats.pooled.detach().float(), dim=-1)
            target = torch.where(seen[idx][:, None], bank[idx], cur)
            bank[idx] = F.normalize(m * target + (1 - m) * cur, dim=-1)
            seen[idx] = True
            out.append(target)
        return out[0], out[1]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the teacher adapters."""
        if self.vea_teacher is None:
            return
        m = float(self.opts.ema_momentum)
        for students, teachers in ((self.vea, self.vea_teacher), (self.tsa, self.tsa_teacher)):
            for s, t in zip(students, teachers):
                params = dict(s.named_parameters())
                for name, buf in t.named_buffers():
                    if name in params:
                        buf.mul_(m).add_(params[name].detach().to(buf.dtype), alpha=1.0 - m)


def _tower_forward(backbone: Backbone, batch: dict, modality: str, n_rows: int) -> torch.Tensor:
    """Pooled embeddings of one tower for the batch (its cached trunk features through the head, or
    the images / captions through the whole tower), all-gathered to ``n_rows`` rows when the
    student's are."""
    trunk, raw, what = ("image_trunk", "pixels", "images") if modality == "image" else ("text_trunk", "ids", "captions")
    if trunk in batch:
        out = (backbone.image_head if modality == "image" else backbone.text_head)(batch[trunk]).pooled
    elif raw in batch:
        out = (backbone.encode_image if modality == "image" else backbone.encode_text)(batch[raw])
    else:
        raise RsitrError(f"RDB's EMA teacher needs the batch's {what} ('{raw}' or '{trunk}')")
    return gather_rows(out) if out.shape[0] != n_rows else out
