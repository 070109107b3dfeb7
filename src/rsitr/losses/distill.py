"""Distillation of teacher models' in-batch similarity distributions into a student (pure tensors).

Follows TinyCLIP's *affinity mimicking* (Wu et al., "TinyCLIP: CLIP Distillation via Affinity
Mimicking and Weight Inheritance", ICCV 2023, Sec. 3.1): with the image->text affinity
``A_i2t = softmax(I T^T / tau)`` (rows) and the text->image affinity ``A_t2i = softmax(T I^T / tau)``
of a batch, the paper's loss is ``L = CE(A_t2i^t, A_t2i^s) + CE(A_i2t^t, A_i2t^s)`` (teacher t as
the target of student s). Here each cross-entropy is replaced by ``KL(teacher || student)``, which
differs from it by the teacher's entropy only (same gradient, but 0 when the student matches the
teacher), and the two directions are averaged instead of summed.

Several teachers: their distributions are averaged as probabilities (``average="probs"``, the
default: a mixture of the teachers' affinities) or their scaled similarities are averaged before
one softmax (``average="logits"``: the mean similarity, sharper where the teachers agree).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIRECTIONS = ("both", "i2t", "t2i")
AVERAGES = ("probs", "logits")


def teacher_affinity(teacher_img: torch.Tensor, teacher_txt: torch.Tensor, teacher_scale: torch.Tensor, average: str = "probs") -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' target distributions of a batch: ``(i2t [B, B] rows over texts, t2i [B, B]
    rows over images)``. ``teacher_img`` / ``teacher_txt``: ``[K, B, D]`` embeddings of K teachers
    (normalised here); ``teacher_scale``: ``[K]`` logit multipliers (1 / temperature)."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    ti = F.normalize(teacher_img.float(), dim=-1)
    tt = F.normalize(teacher_txt.float(), dim=-1)
    logits = torch.einsum("kid,kjd->kij", ti, tt) * teacher_scale.float().view(-1, 1, 1)  # [K, images, texts]
    if average == "logits":
        mean = logits.mean(0)
        return mean.softmax(-1), mean.t().softmax(-1)
    return logits.softmax(-1).mean(0), logits.transpose(1, 2).softmax(-1).mean(0)


def affinity_distill(student_img: torch.Tensor, student_txt: torch.Tensor, student_scale: torch.Tensor | float,
                     target_i2t: torch.Tensor, target_t2i: torch.Tensor, directions: str = "both") -> torch.Tensor:
    """Mean ``KL(teacher || student)`` of the in-batch affinity rows (see the module doc).

    ``student_img`` / ``student_txt``: ``[B, D]`` (row i of each is a matched pair; normalised
    here); ``student_scale``: the student's logit multiplier (1 / temperature, not its log);
    ``target_i2t`` / ``target_t2i``: the teachers' ``[B, B]`` distributions
    (:func:`teacher_affinity`); ``directions``: ``"both"`` (their mean), ``"i2t"`` or ``"t2i"``."""
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
    si = F.normalize(student_img.float(), dim=-1)
    st = F.normalize(student_txt.float(), dim=-1)
    logits = torch.as_tensor(student_scale, dtype=torch.float32, device=si.device) * si @ st.t()
    terms = []
    if directions in ("both", "i2t"):
        terms.append(_kl_rows(target_i2t, logits))
    if directions in ("both", "t2i"):
        terms.append(_kl_rows(target_t2i, logits.t()))
    return torch.stack(terms).mean()


def _kl_rows(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(target_row || softmax(logits_row))``; zero-probability targets add 0."""
    target = target.to(logits.dtype)
    return (torch.xlogy(target, target) - target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
