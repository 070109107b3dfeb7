"""Distillation from teacher runs (``distill.teachers``): the training loop's method-independent
added term ``distill.weight * KL(teacher || student)`` of the in-batch similarity distributions
(:mod:`rsitr.losses.distill`, TinyCLIP's affinity mimicking).

Cost: the student trains on cached trunk activations (:mod:`rsitr.models.trunk_cache`). A teacher
that shares the student's trunk and cut (same backbone, same weights, same ``model.mode`` cut,
same preprocessing) computes from those same activations, so each teacher runs **once** before
training (:func:`teacher_pass`: its trained heads / top blocks, no grad) over every cached view of
every training image and every caption; a step then only looks its embeddings up by the batch's
(image, view) and caption indices. Memory: ``teachers x (views x images + captions) x embed_dim``
in fp16 -- the joint UCM+RSICD model with 4 views: 4 x 12.8k x 256 x 2 B = 26 MB of images and
64k x 256 x 2 B = 33 MB of captions per teacher. The pass is stored in the run's trunk-cache folder
(``tch-<key>.pt``, :func:`cached_teacher_pass`; the key names the teacher file's sha256 and the trunk
cache files it ran over), so a resumed run and the other seeds of a student read it instead of
running it again (about one epoch's time per teacher). Teachers with another backbone or cut, or a
student without a trunk cache (a trainable trunk, ``cache_features: off``), are refused with one
error line: computing a teacher from the images every step would make a distillation epoch cost
several plain ones.

Resume: the teachers' checkpoint files are resolved (a run folder gives its best, else last
checkpoint) and their sha256 recorded in the run config (``distill.sha256``: config.json and
every checkpoint); a resumed run must name the same teachers, whose files must still hash the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rsitr.data.imagesets import TrunkCache, select
from rsitr.data.types import Features
from rsitr.losses.contrastive import logit_scale_exp
from rsitr.losses.distill import affinity_distill, teacher_affinity
from rsitr.models.base import Backbone
from rsitr.models.checkpoint import TrainCheckpoint
from rsitr.models.trunk_cache import trunk_identity
from rsitr.utils.distributed import gather_rows
from rsitr.utils.errors import CheckpointError, RsitrError
from rsitr.utils.cachedir import StaleItem, load_or_compute
from rsitr.utils.io import cached_sha256

log = logging.getLogger(__name__)


# -- which files ---------------------------------------------------------------------------------
def resolve_teachers(teachers: tuple, recorded: tuple = ()) -> list[tuple[str, Path, str]]:
    """``(as given, checkpoint file, sha256)`` of each teacher; with ``recorded`` digests, a file
    that hashes differently is an error (the teacher changed since the run started)."""
    out = []
    for k, given in enumerate(teachers):
        try:
            path = TrainCheckpoint.resolve(given)
        except CheckpointError as exc:
            raise RsitrError(f"distill.teachers: {exc}") from None
        # hashed once per process and file state: pin_teachers and build_teachers both resolve
        digest = cached_sha256(path)
        if recorded and recorded[k] != digest:
            raise RsitrError(f"distill.teachers: {path} changed since the run recorded it (sha256 {digest[:12]}... != {str(recorded[k])[:12]}...); "
                             f"restore that teacher or start a new run")
        out.append((str(given), path, digest))
    return out


def pin_teachers(cfg, prior_config: dict[str, Any] | None = None):
    """``cfg`` with ``distill.sha256`` filled in from the teachers' files (checked against the
    digests ``cfg`` gives, or against those of ``prior_config``, the run being resumed, whose
    teachers must be the same). Unchanged without teachers (and a prior run without any)."""
    d = cfg.distill
    before = dict((prior_config or {}).get("distill") or {})
    before_teachers = tuple(before.get("teachers") or ())
    if prior_config is not None and tuple(d.teachers) != before_teachers:
        raise RsitrError(f"--resume: the run was started with distill.teachers {list(before_teachers)} and is resumed with {list(d.teachers)}; "
                         f"a resumed run keeps its teachers")
    if not d.teachers:
        return cfg
    recorded = tuple(d.sha256) or tuple(before.get("sha256") or ())
    found = resolve_teachers(d.teachers, recorded)
    return dataclasses.replace(cfg, distill=dataclasses.replace(d, sha256=tuple(sha for _, _, sha in found)))


# -- the teachers' embeddings --------------------------------------------------------------------
def _check_teacher(teacher, given: str, ckpt: TrainCheckpoint, student: Backbone, student_label: str, cache: TrunkCache) -> None:
    """Refuse (one line) a teacher whose outputs cannot be computed from the student's cached trunk
    activations."""
    t_mode = ckpt.model_config.get("mode", "heads")
    for modality in ("image", "text"):
        if trunk_identity(teacher.backbone, modality) != trunk_identity(student, modality):
            raise RsitrError(f"distill.teachers: {given}: teacher {ckpt.backbone_source} (mode {t_mode}) and student {student_label} differ in "
                             f"their {modality} trunk (backbone, weights or cut); a teacher must share the student's trunk and cut")
    teacher.backbone.apply_mode(t_mode)
    trained = [m for m in ("image", "text") if teacher.backbone.trunk_trainable(m)]
    teacher.backbone.requires_grad_(False)
    if trained:
        raise RsitrError(f"distill.teachers: {given}: the teacher trained its {' and '.join(trained)} trunk (mode {t_mode}); "
                         "only teachers with frozen trunks below the student's cut can run on the student's trunk cache")
    if teacher.method is not None and teacher.method.needs_tokens and (cache.image[0].tokens.shape[1] == 0 or cache.text.tokens.shape[1] == 0):
        raise RsitrError(f"distill.teachers: {given}: the teacher's method {teacher.method.name} needs token features; "
                         f"the student's trunk cache holds pooled features only")


@torch.no_grad()
def teacher_pass(teacher, cache: TrunkCache, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One teacher over the student's trunk cache, once: its normalised pooled embeddings of every
    cached view of every image ``[views, images, D]`` and of every caption ``[captions, D]`` (fp16,
    CPU), and its logit multiplier (``exp`` of its temperature, clamped as in CLIP)."""
    bb = teacher.backbone.to(device).eval()
    if teacher.method is not None:
        teacher.method.to(device).eval()

    def run(f: Features, head) -> torch.Tensor:
        parts = []
        for a in range(0, f.pooled.shape[0], batch_size):
            idx = torch.arange(a, min(a + batch_size, f.pooled.shape[0]))
            parts.append(F.normalize(head(select(f, idx, device)).pooled.float(), dim=-1).half().cpu())
        return torch.cat(parts)

    image = torch.stack([run(f, bb.image_head) for f in cache.image])
    text = run(cache.text, bb.text_head)
    temp = teacher.method.temperature(bb) if teacher.method is not None else bb.logit_scale
    return image, text, float(logit_scale_exp(temp.detach() if temp is not None else 0.0))


PASS_FORMAT = 1  # of the stored teacher passes (tch-<key>.pt); a new format gets new keys


def pass_key(teacher_sha256: str, cache: TrunkCache, batch_size: int, device: torch.device) -> str | None:
    """The content key of one teacher's pass over ``cache``: the teacher file's sha256, the trunk
    cache files' own content keys, the batch size and device type (which can change the last bits
    of the fp16 output); None when the cache has no files to name it by."""
    if not cache.keys:
        return None
    blob = json.dumps({"format": PASS_FORMAT, "teacher": teacher_sha256, "trunk": list(cache.keys), "batch_size": int(batch_size),
                       "device": device.type}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cached_teacher_pass(teacher, cache: TrunkCache, batch_size: int, device: torch.device, *, cache_dir: Path | None,
                        sha256: str, describe: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`teacher_pass`, read from ``cache_dir/tch-<key>.pt`` when an earlier run stored it (for
    the same teacher file and trunk cache), else run and stored there (atomically, with a ``.json``
    description; ``rsitr cache ls|prune`` list and prune it with the trunk caches)."""
    key = pass_key(sha256, cache, batch_size, device) if cache_dir is not None else None
    path = cache_dir / f"tch-{key}.pt" if key is not None else None
    want = (len(cache.image), cache.image[0].pooled.shape[0], cache.text.pooled.shape[0])

    def load(p: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
        from rsitr.utils.weights import load_torch_file

        d = load_torch_file(p, what="stored teacher pass")
        fits = isinstance(d, dict) and {"image", "text", "scale"} <= d.keys() and all(isinstance(d[k], torch.Tensor) for k in ("image", "text")) \
            and (isinstance(d["scale"], (int, float)) or (isinstance(d["scale"], torch.Tensor) and d["scale"].numel() == 1))
        got = (*tuple(d["image"].shape[:2]), d["text"].shape[0]) if fits and d["image"].dim() >= 2 and d["text"].dim() >= 1 else None
        if got != want:
            raise StaleItem(f"{p}: a stored teacher pass of another shape ({got}, expected views, images, captions {want})")
        return d["image"], d["text"], float(d["scale"])

    def record(value) -> dict:
        return {**describe, "what": "teacher pass", "teacher_sha256": sha256, "trunk": list(cache.keys), "views": want[0],
                "entries": want[1], "captions": want[2], "embed_dim": int(value[0].shape[-1])}

    return load_or_compute(path, "teacher pass", load=load, compute=lambda: teacher_pass(teacher, cache, batch_size, device),
                           save=lambda v, tmp: torch.save({"image": v[0], "text": v[1], "scale": v[2]}, tmp), describe=record)


@dataclass
class Teachers:
    """The teachers' embeddings of the training set (what :func:`teacher_pass` gave) and the
    distillation settings; :meth:`loss` is the term a step adds."""

    image: torch.Tensor  # [teachers, views, images, D] fp16, normalised
    text: torch.Tensor  # [teachers, captions, D]
    scale: torch.Tensor  # [teachers] logit multipliers
    weight: float
    temperature: float | None
    directions: str
    average: str

    def loss(self, img: torch.Tensor, txt: torch.Tensor, student_log_scale: torch.Tensor, batch: dict) -> torch.Tensor:
        """The distillation term of a batch: student pooled embeddings ``img`` / ``txt`` (rows
        gathered from every process under torchrun) against the teachers' embeddings of the
        batch's (image, cached view) and captions."""
        n = img.shape[0]
        ii = gather_rows(batch["image_index"], n).cpu()
        vi = gather_rows(batch["image_view"], n).cpu()
        ti = gather_rows(batch["text_index"], n).cpu()
        t_img = self.image[:, vi, ii].to(img.device)
        t_txt = self.text[:, ti].to(img.device)
        if self.temperature is not None:
            t_scale = torch.full_like(self.scale, 1.0 / self.temperature)
            s_scale = torch.tensor(1.0 / self.temperature, device=img.device)
        else:
            t_scale, s_scale = self.scale, logit_scale_exp(student_log_scale, img.device)
        i2t, t2i = teacher_affinity(t_img, t_txt, t_scale.to(img.device), self.average)
        return affinity_distill(img, txt, s_scale, i2t, t2i, self.directions)


def build_teachers(cfg, student: Backbone, cache: TrunkCache | None, device: torch.device, cache_dir: Path | None = None) -> Teachers | None:
    """Load ``cfg.distill.teachers`` (checked against ``cfg.distill.sha256``), check each against
    the student and run each once over the trunk cache (or read its stored pass from ``cache_dir``,
    the run's trunk-cache folder); None without teachers."""
    from rsitr.methods.factory import from_checkpoint

    d = cfg.distill
    if not d.teachers:
        return None
    label = f"{cfg.model.backbone} (mode {cfg.model.mode})"
    if cache is None or cache.image is None or cache.text is None:
        raise RsitrError(f"distill.teachers: distillation runs the teachers on the student's trunk cache, and student {label} has none "
                         f"(a trainable trunk, cache_features: off, or a method without trunk caching)")
    images, texts, scales = [], [], []
    for given, path, sha in resolve_teachers(d.teachers, d.sha256):
        ckpt = TrainCheckpoint.load(path)
        teacher = from_checkpoint(ckpt, device="cpu")
        _check_teacher(teacher, given, ckpt, student, label, cache)
        img, txt, scale = cached_teacher_pass(teacher, cache, cfg.eval_batch_size, device, cache_dir=cache_dir, sha256=sha,
                                              describe={"backbone": str(ckpt.backbone_source), "teacher": str(path), "mode": ckpt.model_config.get("mode", "heads")})
        if img.shape[-1] != txt.shape[-1]:
            raise RsitrError(f"distill.teachers: {given}: image and text embeddings differ in size ({img.shape[-1]} vs {txt.shape[-1]})")
        if images and img.shape[-1] != images[0].shape[-1]:
            raise RsitrError(f"distill.teachers: {given}: embeds in {img.shape[-1]} dimensions, the first teacher in {images[0].shape[-1]}; "
                             "teachers are stacked per batch and must share one embedding size")
        log.info("teacher %s (%s): %d image views x %d images, %d captions, logit scale %.2f", given, path, img.shape[0], img.shape[1], txt.shape[0], scale)
        images.append(img)
        texts.append(txt)
        scales.append(scale)
    return Teachers(torch.stack(images), torch.stack(texts), torch.tensor(scales), d.weight, d.temperature, d.directions, d.average)


__all__ = ["PASS_FORMAT", "Teachers", "build_teachers", "cached_teacher_pass", "pass_key", "pin_teachers", "resolve_teachers", "teacher_pass"]
