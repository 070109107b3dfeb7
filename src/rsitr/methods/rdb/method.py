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

Where the adapters go (``install``)
-----------------------------------
* CLIP: ``backbone.visual.transformer.resblocks`` (VEA) and ``backbone.transformer.resblocks``
  (TSA); each chosen block's ``adapter`` slot gets one adapter, applied to the block output.
* Other backbones: ``backbone.adapter_blocks("image"|"text")`` (a ModuleList of blocks with an
  ``adapter`` slot) when it exists; for a modality without transformer blocks (the CNN image
  tower) ``backbone.token_adapter_slot("image")`` -- one slot over the spatial tokens
  ``[B, HW, C]`` before pooling -- receives a single VEA (``vea_layers`` then only switches it
  on or off). Its width comes from ``slot.width`` or ``backbone.info.config["image_width"]``;
  ``needs_tokens`` is then True so that cached trunk features keep their tokens.
* The adapters are submodules of the method (``self.vea``/``self.tsa``, so the loop trains them)
  *and* of the backbone (the slots). Their tensors are saved once, with the backbone state
  (``backbone.*``): the method's own ``state_dict`` leaves them out and its ``load_state_dict``
  does not ask for them (the loop's ``load_trainable_state`` names tensors with the
  de-duplicating ``named_parameters()``, where a shared adapter appears only under
  ``backbone.*``; a second copy under ``method.*`` would be rejected on resume and reload).

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

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.losses.contrastive import info_nce, logit_scale_exp
from rsitr.losses.dtcl import classification_loss, consistency_kl, fixed_weighting, similarity_logits, uncertainty_weighting
from rsitr.methods.adapters import DiffAttnAdapter, HierAttnAdapter, frozen_copy
from rsitr.models.base import Backbone, Features
from rsitr.utils.distributed import gather_rows
from rsitr.methods.base import Capabilities, Method, register_method
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

@dataclass
class RDBOptions:
    """RDB's options (see the module doc)."""

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
_ADAPTER_KEY = re.compile(r"(^|\.)(vea|tsa)\.\d+\.")


# -- helpers ---------------------------------------------------------------------------------
def resolve_layers(spec: Any, n: int, what: str) -> list[int]:
    """Block indices from ``"all"`` / ``"last_half"`` / ``"none"`` / a list of (possibly
    negative) indices, for a tower of ``n`` blocks."""
    if spec is None or spec == "none" or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        return []
    if spec == "all":
        return list(range(n))
    if spec == "last_half":
        return list(range(n // 2, n))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        raise RsitrError(f"RDB option {what} must be 'all', 'last_half', 'none' or a list of block indices, got {spec!r}")
    out = []
    for i in spec:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise RsitrError(f"RDB option {what}: block {i} does not exist (the tower has {n} blocks)")
        if j not in out:
            out.append(j)
    return sorted(out)


def _wanted(spec: Any, what: str) -> bool:
    """Whether a layer spec asks for any adapter (for a single token slot, any non-empty spec
    other than "none" switches it on)."""
    if spec is None or spec == "none" or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        return False
    if spec in ("all", "last_half") or isinstance(spec, (int, list, tuple)):
        return True
    raise RsitrError(f"RDB option {what} must be 'all', 'last_half', 'none' or a list of block indices, got {spec!r}")


def _block_width(block: nn.Module) -> int:
    w = getattr(block, "width", None)
    if isinstance(w, int):
        return w
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    raise RsitrError(f"cannot tell the hidden width of adapter block {type(block).__name__} (no 'width' attribute or LayerNorm)")


def find_slots(backbone: Backbone, modality: str) -> tuple[str, Any] | None:
    """Where a modality's adapters go: ``("blocks", ModuleList)``, ``("token", slot)`` or None."""
    if hasattr(backbone, "adapter_blocks"):
        blocks = backbone.adapter_blocks(modality)
        if blocks is not None:
            return "blocks", blocks
        slot_fn = getattr(backbone, "token_adapter_slot", None)
        slot = slot_fn(modality) if slot_fn is not None else None
        return ("token", slot) if slot is not None else None
    tower = getattr(backbone, "visual", None) if modality == "image" else backbone
    transformer = getattr(tower, "transformer", None) if tower is not None else None
    blocks = getattr(transformer, "resblocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "adapter"):
        return "blocks", blocks
    return None


@register_method
class RDB(Method):
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
        self._token_slot = False  # an adapter over a token slot (CNN tower): cached trunk features keep their tokens
        for key in ("weighting", "teacher", "cls_on"):
            allowed = {"weighting": ("uncertainty", "fixed"), "teacher": ("ema", "bank"), "cls_on": ("both", "image", "text")}[key]
            if getattr(o, key) not in allowed:
                raise RsitrError(f"RDB option {key} must be one of {allowed}, got {getattr(o, key)!r}")
        if o.symmetric not in (False, True, "vea", "tsa"):
            raise RsitrError(f"RDB option symmetric must be false, true, 'vea' or 'tsa', got {o.symmetric!r}")
        for key in ("ema_momentum", "bank_momentum"):
            if not 0.0 <= float(getattr(o, key)) < 1.0:
                raise RsitrError(f"RDB option {key} must be in [0, 1), got {getattr(o, key)!r}")

        # -- adapters -----------------------------------------------------------------------
        self.vea = nn.ModuleList()
        self.tsa = nn.ModuleList()
        self._targets: dict[str, list[int | None]] = {"image": [], "text": []}  # block index, None = token slot
        for modality, spec_key in (("image", "vea_layers"), ("text", "tsa_layers")):
            found = find_slots(backbone, modality)
            spec = getattr(o, spec_key)
            if found is None:
                if _wanted(spec, spec_key):
                    log.warning("RDB: backbone %s has no adapter slots for the %s tower; no %s installed",
                                backbone.info.name, modality, "VEA" if modality == "image" else "TSA")
                continue
            kind, where = found
            if kind == "blocks":
                layers = resolve_layers(spec, len(where), spec_key)
                for i in layers:
                    self._add(modality, _block_width(where[i]), depth=i + 1)
                self._targets[modality] = list(layers)
            elif _wanted(spec, spec_key):
                width = getattr(where, "width", None) or backbone.info.config.get(f"{modality}_width")
                if not isinstance(width, int):
                    raise RsitrError(f"cannot tell the width of the {modality} token adapter slot of {backbone.info.name}")
                self._add(modality, width, depth=int(o.token_slot_depth))
                self._targets[modality] = [None]
                self._token_slot = True  # the token slot adapts cached trunk tokens
        self._owners: list[tuple[nn.Module, nn.Module, nn.Module | None]] = []  # (slot owner, adapter, teacher)

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

        self.register_state_dict_post_hook(RDB._drop_installed_adapters)
        self.register_load_state_dict_post_hook(RDB._ignore_installed_adapters)
        self.register_load_state_dict_pre_hook(RDB._build_cls_head_from_state)
        log.info("RDB: %d VEA (%s params), %d TSA (%s params); DTCL terms %s, %s weighting, teacher %s",
                 len(self.vea), f"{sum(p.numel() for p in self.vea.parameters()):,}", len(self.tsa),
                 f"{sum(p.numel() for p in self.tsa.parameters()):,}", self.terms, o.weighting, o.teacher)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(train_tokens=self._token_slot)

    def _add(self, modality: str, width: int, depth: int) -> None:
        o = self.opts
        kind = {"vea": "image", True: "image", "tsa": "text"}.get(o.symmetric, modality)  # symmetric: one type for both
        target = self.vea if modality == "image" else self.tsa
        if kind == "image":
            target.append(DiffAttnAdapter(width, int(o.vea_bottleneck), int(o.vea_heads), depth=depth))
        else:
            target.append(HierAttnAdapter(width, int(o.tsa_bottleneck), int(o.phrase_window)))

    # -- installation ---------------------------------------------------------------------------
    def install(self, backbone: Backbone) -> None:
        """Put the adapters into ``backbone``'s slots (idempotent; also at load time)."""
        self._owners = []
        for modality, adapters, teachers in (("image", self.vea, self.vea_teacher), ("text", self.tsa, self.tsa_teacher)):
            targets = self._targets[modality]
            found = find_slots(backbone, modality)
            if found is not None:  # an RDB adapter left by an earlier install does not survive this one
                for owner in ([found[1]] if found[0] == "token" else list(found[1])):
                    if isinstance(owner.adapter, (DiffAttnAdapter, HierAttnAdapter)):
                        owner.adapter = None
            if not targets:
                continue
            if found is None:
                raise RsitrError(f"RDB: backbone {backbone.info.name} has no {modality} adapter slots")
            kind, where = found
            for k, t in enumerate(targets):
                if (t is None) != (kind == "token") or (t is not None and t >= len(where)):
                    raise RsitrError(f"RDB: the {modality} tower of {backbone.info.name} does not match the adapters built for it")
                owner = where if t is None else where[t]
                owner.adapter = adapters[k]
                self._owners.append((owner, adapters[k], teachers[k] if teachers is not None else None))

    @contextlib.contextmanager
    def _teacher_installed(self) -> Iterator[None]:
        try:
            for owner, _, teacher in self._owners:
                owner.adapter = teacher
            yield
        finally:
            for owner, student, _ in self._owners:
                owner.adapter = student

    # adapters live in the backbone's state (see the module doc)
    @staticmethod
    def _drop_installed_adapters(module: "RDB", state: dict, prefix: str, local_metadata) -> None:
        if module._owners:
            for k in [k for k in state if k.startswith((prefix + "vea.", prefix + "tsa."))]:
                del state[k]

    @staticmethod
    def _ignore_installed_adapters(module: "RDB", incompatible) -> None:
        if module._owners:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not _ADAPTER_KEY.search(k)]

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
                    if "image_trunk" in batch:
                        t_img = backbone.image_head(batch["image_trunk"]).pooled
                    elif "pixels" in batch:
                        t_img = backbone.encode_image(batch["pixels"])
                    else:
                        raise RsitrError("RDB's EMA teacher needs the batch's images ('pixels' or 'image_trunk')")
                    if t_img.shape[0] != img.pooled.shape[0]:
                        t_img = gather_rows(t_img)
                if have_txt:
                    if "text_trunk" in batch:
                        t_txt = backbone.text_head(batch["text_trunk"]).pooled
                    elif "ids" in batch:
                        t_txt = backbone.encode_text(batch["ids"])
                    else:
                        raise RsitrError("RDB's EMA teacher needs the batch's captions ('ids' or 'text_trunk')")
                    if t_txt.shape[0] != txt.pooled.shape[0]:
                        t_txt = gather_rows(t_txt)
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
