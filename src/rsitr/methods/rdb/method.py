"""RDB -- Representation Discrepancy Bridging (Ning et al., Neurocomputing 2025, arXiv 2505.16756).

Parameter-efficient fine-tuning of a frozen dual encoder with

* the **Cross-Modal Asymmetric Adapter** (CMAA): a Visual Enhancement Adapter (VEA, differential
  attention) in the image tower and a Text Semantic Adapter (TSA, hierarchical attention) in the
  text tower -- different structures *and* sizes (:mod:`rsitr.methods.adapters`);
* the **Dual-Task Consistency Loss** (DTCL): an adaptively weighted sum of the cross-modal
  contrastive loss, a scene-classification loss (the second task; labels are the dataset's scene
  classes) and a consistency loss against an exponential-moving-average (EMA) teacher.

Select it with ``method.name: rdb`` (``--method rdb``); train with ``model.mode: frozen`` on CLIP
(only the method's parameters train) or ``model.mode: heads`` on the two-tower backbone (its
randomly initialised projection heads train too).
This module: the options and the method (:class:`RDB`), which installs the adapters
(:mod:`~rsitr.methods.rdb.cmaa`) and computes DTCL, with its teacher
(:mod:`~rsitr.methods.rdb.teacher`).

Options (``method.options``; every key has a default, unknown keys are an error)
-------------------------------------------------------------------------------
Adapters:

* ``vea_layers`` ("all") / ``tsa_layers`` ("all"): blocks that get an adapter: ``"all"``,
  ``"last_half"``, ``"none"``, or a list of block indices (negative counts from the end).
  *Paper silent* (in the text available here) on the exact set: we default to every block,
  as the PEFT adapters RDB compares with (AdaptFormer, HarMA) do.
* ``vea_bottleneck`` (64), ``vea_heads`` (4): VEA width ``r`` and differential-attention heads
  (``r`` must be a multiple of ``2 * heads``; each head has Q/K halves of ``r / (2 heads)``).
* ``tsa_bottleneck`` (32): TSA width. *Paper silent* on sizes: the asymmetric defaults give the
  image side the larger, more expressive adapter -- RDB's motivation is that the text modality
  dominates optimisation and the image side needs the extra capacity.
* ``phrase_window`` (4): TSA phrase = fixed window of k consecutive token positions (special
  tokens included); ``0`` = one group, sentence-level attention only. *Paper silent* on how
  phrases are formed: fixed windows need no parser and work for any tokenizer.
* ``symmetric`` (false): ablation of the *asymmetric* design. ``false``: VEA in the image tower,
  TSA in the text tower (CMAA). ``true`` or ``"vea"``: the same adapter type *and* size in both
  towers -- a VEA (``vea_bottleneck``, ``vea_heads``; depth from the host block as usual) in
  every chosen slot of the image *and* the text tower (padding keys masked on the text side).
  ``"tsa"``: a TSA (``tsa_bottleneck``, ``phrase_window``) in both towers. The layer specs
  (``vea_layers`` image, ``tsa_layers`` text) still choose the slots, and ``self.vea`` /
  ``self.tsa`` still hold the image / text tower's adapters whatever their type.
* ``token_slot_depth`` (12): the depth ``l`` giving ``lambda_init`` for a VEA in a single token
  slot (CNN tower: the slot sits after a deep trunk). In blocks, ``l`` is the block's 1-based
  index (as in the DIFF Transformer).

DTCL (each term and the weighting switchable for ablations):

* ``loss_contrastive`` (true): symmetric InfoNCE on the pooled embeddings with the model's
  temperature.
* ``loss_cls`` (true): scene classification: one linear head on the L2-normalised pooled
  embeddings, cross-entropy on ``cls_on`` = ``"both"`` (default; image and text share the head,
  mean of the two), ``"image"`` or ``"text"``. The classes are ``train_data.classes``, stored in
  ``options["classes"]``; a dataset without labels turns the term off (logged).
* ``loss_consistency`` (true): ``KL(teacher || student)`` of the in-batch similarity
  distributions (softmax over texts for each image and over images for each text, averaged),
  the teacher's distribution being the soft target (no gradient).
* ``teacher`` ("ema"): ``"ema"`` -- the teacher is an EMA copy of the adapters
  (``theta_t <- m theta_t + (1 - m) theta_s`` after every optimizer step, ``m = ema_momentum``
  = 0.999); its similarities come from a second, gradient-free forward of the batch with the
  teacher adapters swapped into the slots (backbone in eval mode). Parameters shared by teacher
  and student (frozen backbone, and a trainable backbone part such as the two-tower heads) are
  not duplicated. Costs one extra no-grad forward of each adapted tower per step (with cached
  CNN trunk features the image side is only the token adapter and head).
  ``"bank"`` -- the cheap variant (temporal ensembling, Laine & Aila 2017): an EMA, per training
  image and caption, of its normalised student embedding (``bank_momentum`` = 0.6 per visit);
  no second forward. The bank is not checkpointed (an interrupted run resumes with an empty
  bank), so only ``"ema"`` resumes exactly. *Paper silent* on the teacher's scope: ``"ema"`` is
  the faithful default.
* ``consistency_temperature`` (null): temperature of both distributions in the consistency term;
  null = the model's current contrastive temperature.
* ``weighting`` ("uncertainty"): ``"uncertainty"`` -- learned homoscedastic-uncertainty weights
  (Kendall et al. 2018): ``L = sum_i exp(-s_i) L_i + s_i``, ``s_i`` initialised at 0, one per
  enabled term (*paper*: "adaptive weighted combination", scheme not given in the text
  available here); ``"fixed"`` -- ``sum_i w_i L_i`` with ``weight_contrastive`` (1.0),
  ``weight_cls`` (0.5), ``weight_consistency`` (1.0).
* ``ema_momentum`` (0.999), ``bank_momentum`` (0.6): see ``teacher``.
* ``classes`` (set from the training data): scene class names (list) or null.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rsitr.losses.contrastive import info_nce, logit_scale_exp
from rsitr.losses.dtcl import classification_loss, consistency_kl, fixed_weighting, similarity_logits, uncertainty_weighting
from rsitr.methods.base import Capabilities, Method, register_method
from rsitr.methods.rdb.cmaa import CMAAMixin
from rsitr.methods.rdb.teacher import TeacherMixin
from rsitr.models.base import Backbone, Features
from rsitr.utils.distributed import gather_rows
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)


@dataclass
class RDBOptions:
    """RDB's options (see the module doc)."""

    # allowed values, checked when the options are read (rsitr.utils.config.check_declared_ranges)
    RANGES: ClassVar[dict] = {"vea_bottleneck": (1, None, False), "vea_heads": (1, None, False), "tsa_bottleneck": (1, None, False),
                              "phrase_window": (1, None, False), "token_slot_depth": (1, None, False),
                              "ema_momentum": (0, 1, "hi_open"), "bank_momentum": (0, 1, "hi_open"), "consistency_temperature": (0, None, True),
                              "weight_contrastive": (0, None, False), "weight_cls": (0, None, False), "weight_consistency": (0, None, False)}
    FINITE: ClassVar[bool] = True

    vea_layers: Any = "all"
    tsa_layers: Any = "all"
    vea_bottleneck: int = 64
    vea_heads: int = 4
    tsa_bottleneck: int = 32
    phrase_window: int = 4
    token_slot_depth: int = 12
    symmetric: bool | str = False
    loss_contrastive: bool = True
    loss_cls: bool = True
    loss_consistency: bool = True
    cls_on: str = "both"
    teacher: str = "ema"
    ema_momentum: float = 0.999
    bank_momentum: float = 0.6
    consistency_temperature: float | None = None
    weighting: str = "uncertainty"
    weight_contrastive: float = 1.0
    weight_cls: float = 0.5
    weight_consistency: float = 1.0
    classes: list[str] | None = None


TERMS = ("contrastive", "cls", "consistency")


@register_method
class RDB(CMAAMixin, TeacherMixin, Method):
    """Cross-Modal Asymmetric Adapter + Dual-Task Consistency Loss (see the module doc)."""

    name = "rdb"
    label = "RDB"
    Options = RDBOptions
    contrastive_off = {"loss_contrastive": False}

    def __init__(self, backbone: Backbone, options: dict[str, Any] | None, train_data=None):
        super().__init__(backbone, options, train_data)
        o = self.opts
        if train_data is not None:
            o.classes = list(train_data.classes) if train_data.classes else None
        for key in ("weighting", "teacher", "cls_on"):
            allowed = {"weighting": ("uncertainty", "fixed"), "teacher": ("ema", "bank"), "cls_on": ("both", "image", "text")}[key]
            if getattr(o, key) not in allowed:
                raise RsitrError(f"RDB option {key} must be one of {allowed}, got {getattr(o, key)!r}")
        if o.symmetric not in (False, True, "vea", "tsa"):
            raise RsitrError(f"RDB option symmetric must be false, true, 'vea' or 'tsa', got {o.symmetric!r}")
        for key in ("ema_momentum", "bank_momentum"):
            if not 0.0 <= float(getattr(o, key)) < 1.0:
                raise RsitrError(f"RDB option {key} must be in [0, 1), got {getattr(o, key)!r}")
        self._build_adapters(backbone)

        # -- DTCL -------------------------------------------------------------------------------
        self.terms = [t for t in TERMS if getattr(o, f"loss_{t}")]
        classes = o.classes
        self.cls_head: nn.Linear | None = None
        if "cls" in self.terms and not classes:
            if train_data is not None:
                log.info("RDB: the training data has no scene classes: the classification term of DTCL is off")
            else:  # rebuilt from a checkpoint: a stored head is restored by _build_cls_head_from_state
                log.debug("RDB: no scene classes in the options; no classification head until a state provides one")
            self.terms.remove("cls")
        elif "cls" in self.terms:
            self.cls_head = nn.Linear(backbone.embed_dim, len(classes))
        if "consistency" in self.terms and o.teacher == "ema" and not (len(self.vea) or len(self.tsa)):
            log.warning("RDB: no adapters installed, an EMA teacher equals the student: the consistency term is off")
            self.terms.remove("consistency")
        if not self.terms:
            raise RsitrError("RDB: every DTCL term is off (loss_contrastive/loss_cls/loss_consistency)")
        self.log_vars = nn.Parameter(torch.zeros(len(TERMS))) if o.weighting == "uncertainty" else None
        self._build_teacher(backbone, train_data)

        self.register_state_dict_post_hook(RDB._drop_installed_adapters)
        self.register_load_state_dict_post_hook(RDB._ignore_installed_adapters)
        self.register_load_state_dict_pre_hook(RDB._build_cls_head_from_state)
        log.info("RDB: %d VEA (%s params), %d TSA (%s params); DTCL terms %s, %s weighting, teacher %s",
                 len(self.vea), f"{sum(p.numel() for p in self.vea.parameters()):,}", len(self.tsa),
                 f"{sum(p.numel() for p in self.tsa.parameters()):,}", self.terms, o.weighting, o.teacher)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(train_tokens=self._token_slot)

    @staticmethod
    def _build_cls_head_from_state(module: "RDB", state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        # a checkpoint whose options lost "classes" still carries the head: rebuild it from its shape
        w = state.get(prefix + "cls_head.weight")
        if module.cls_head is None and w is not None and module.opts.loss_cls:
            module.cls_head = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
            module.terms = [t for t in TERMS if t in module.terms or t == "cls"]

    # -- training -------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, img: Features, txt: Features, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.opts
        scale_log = torch.as_tensor(self.temperature(backbone), dtype=torch.float32, device=img.pooled.device)
        losses: dict[str, torch.Tensor] = {}
        if "contrastive" in self.terms:
            losses["contrastive"] = info_nce(img.pooled, txt.pooled, scale_log, same=self.same_text(batch, img.pooled.shape[0]), positives=self.positives)
        if "cls" in self.terms and "labels" in batch:
            labels = batch["labels"]
            if labels.shape[0] != img.pooled.shape[0]:
                labels = gather_rows(labels)
            pooled = {"both": [img.pooled, txt.pooled], "image": [img.pooled], "text": [txt.pooled]}[o.cls_on]
            losses["cls"] = classification_loss(self.cls_head, pooled, labels)
        if "consistency" in self.terms:
            if o.consistency_temperature is None:
                scale = logit_scale_exp(scale_log)
            else:
                scale = torch.tensor(1.0 / float(o.consistency_temperature), device=img.pooled.device)
            t_img, t_txt = self._teacher_embeddings(backbone, img, txt, batch)
            student = similarity_logits(img.pooled, txt.pooled, scale)
            teacher = similarity_logits(t_img, t_txt, scale.detach())
            losses["consistency"] = consistency_kl(student, teacher)
        if o.weighting == "uncertainty":
            log_vars = {t: self.log_vars[i] for i, t in enumerate(TERMS)}
            total, weights = uncertainty_weighting(losses, log_vars)
        else:
            total, weights = fixed_weighting(losses, {t: float(getattr(o, f"weight_{t}")) for t in TERMS})
        logs = {"loss": float(total.detach())}
        for k, v in losses.items():
            logs[k] = float(v.detach())
            logs[f"w_{k}"] = weights[k]
        return total, logs
