"""iEBAKER's SAR - Sort After Reversed retrieval (``sar: true`` or ``rerank: sar``).

:meth:`IEBAKER.similarity` re-scores the evaluation matrix with :func:`rsitr.retrieval.rerank.sar`
(top ``sar_k`` candidates of each query re-sorted by their reverse rank; ``sar_k_t2i``/``sar_k_i2t``
override per direction; ``sar_reverse_weight``; ``sar_direction``). The option is read at call
time, so ``method.opts.rerank = "sar"`` switches it on for a loaded checkpoint.
"""
from __future__ import annotations

import torch


class SARMixin:
    """The re-ranking part of :class:`~rsitr.methods.iebaker.method.IEBAKER` (reads ``self.opts``)."""

    @property
    def sar_enabled(self) -> bool:
        return bool(self.opts.sar) or self.opts.rerank == "sar"

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
