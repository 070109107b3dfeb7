"""RDB's Cross-Modal Asymmetric Adapter (CMAA): which blocks get a VEA (image tower) or a TSA
(text tower), and how they are put into the backbone's slots. The adapters themselves are
:mod:`rsitr.methods.adapters`.

Where the adapters go (``install``)
-----------------------------------
The slots the backbone declares, :meth:`rsitr.models.base.Backbone.adapter_slots`:

* ``"blocks"`` (CLIP's residual blocks in both towers, MiniLM's layers): each chosen block's
  ``adapter`` slot gets one adapter, applied to the block output;
* ``"token"`` (a modality without transformer blocks, e.g. the two-tower's CNN image tower): one
  slot over the spatial tokens ``[B, HW, C]`` before pooling receives a single VEA
  (``vea_layers`` then only switches it on or off); ``needs_tokens`` is then True so that
  cached trunk features keep their tokens.

The adapters' widths are the ones the backbone declares for its slots.
* The adapters are submodules of the method (``self.vea``/``self.tsa``, so the loop trains them)
  *and* of the backbone (the slots). Their tensors are saved once, with the backbone state
  (``backbone.*``): the method's own ``state_dict`` leaves them out and its ``load_state_dict``
  does not ask for them (the loop's ``load_trainable_state`` names tensors with the
  de-duplicating ``named_parameters()``, where a shared adapter appears only under
  ``backbone.*``; a second copy under ``method.*`` would be rejected on resume and reload).
"""
from __future__ import annotations

import logging
import re
from typing import Any

from torch import nn

from rsitr.methods.adapters import DiffAttnAdapter, HierAttnAdapter
from rsitr.models.base import Backbone
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

_ADAPTER_KEY = re.compile(r"(^|\.)(vea|tsa)\.\d+\.")


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


class CMAAMixin:
    """The adapter part of :class:`~rsitr.methods.rdb.method.RDB`: reads ``self.opts``; holds the
    adapters ``vea`` / ``tsa``, where they go (``_targets``) and, once installed, their slots
    (``_owners``)."""

    def _build_adapters(self, backbone: Backbone) -> None:
        """One adapter per chosen block (or token slot) of each tower, per the layer specs."""
        o = self.opts
        self._token_slot = False  # an adapter over a token slot (CNN tower): cached trunk features keep their tokens
        self.vea = nn.ModuleList()
        self.tsa = nn.ModuleList()
        self._targets: dict[str, list[int | None]] = {"image": [], "text": []}  # block index, None = token slot
        for modality, spec_key in (("image", "vea_layers"), ("text", "tsa_layers")):
            found = backbone.adapter_slots(modality)
            spec = getattr(o, spec_key)
            if found is None:
                if _wanted(spec, spec_key):
                    log.warning("RDB: backbone %s has no adapter slots for the %s tower; no %s installed",
                                backbone.info.name, modality, "VEA" if modality == "image" else "TSA")
                continue
            if found.kind == "blocks":
                layers = resolve_layers(spec, len(found), spec_key)
                for i in layers:
                    self._add(modality, found.widths[i], depth=i + 1)
                self._targets[modality] = list(layers)
            elif _wanted(spec, spec_key):
                self._add(modality, found.widths[0], depth=int(o.token_slot_depth))
                self._targets[modality] = [None]
                self._token_slot = True  # the token slot adapts cached trunk tokens
        self._owners: list[tuple[nn.Module, nn.Module, nn.Module | None]] = []  # (slot owner, adapter, teacher)

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
            found = backbone.adapter_slots(modality)
            if found is not None:  # an RDB adapter left by an earlier install does not survive this one
                for owner in found.owners:
                    if isinstance(owner.adapter, (DiffAttnAdapter, HierAttnAdapter)):
                        owner.adapter = None
            if not targets:
                continue
            if found is None:
                raise RsitrError(f"RDB: backbone {backbone.info.name} has no {modality} adapter slots")
            for k, t in enumerate(targets):
                if (t is None) != (found.kind == "token") or (t is not None and t >= len(found)):
                    raise RsitrError(f"RDB: the {modality} tower of {backbone.info.name} does not match the adapters built for it")
                owner = found.owners[0 if t is None else t]
                owner.adapter = adapters[k]
                self._owners.append((owner, adapters[k], teachers[k] if teachers is not None else None))

    # adapters live in the backbone's state (see the module doc)
    @staticmethod
    def _drop_installed_adapters(module: "CMAAMixin", state: dict, prefix: str, local_metadata) -> None:
        if module._owners:
            for k in [k for k in state if k.startswith((prefix + "vea.", prefix + "tsa."))]:
                del state[k]

    @staticmethod
    def _ignore_installed_adapters(module: "CMAAMixin", incompatible) -> None:
        if module._owners:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not _ADAPTER_KEY.search(k)]

