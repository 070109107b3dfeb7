"""RDB comparison: zero-shot / full fine-tuning / PEFT baselines (adapter, LoRA) / RDB and its
ablations, with one budget -- the suite ``configs/suites/rdb-comparison.yaml`` run by the one
runner (``rsitr bench rdb`` is its alias, :mod:`rsitr.cli.bench`), and the ``params`` measurement
its report renders.

The rows (the suite's methods):

* ``zero-shot``: no training (``train: false``), the backbone as loaded (the run's seed is set
  first, as the loop does). On the two-tower backbone the projection heads are randomly
  initialised, so this row is **near chance** by construction: it is the starting point, not a
  pretrained zero-shot CLIP.
* ``full``: the baseline method (symmetric InfoNCE) with ``model.mode: full`` -- on the towers
  both trunks train (expensive on CPU; the shared budget keeps it bounded). ``locked-image`` (LiT:
  text trunk + heads) is available as an extra row, not run by ``rsitr bench rdb`` unless named.
* ``adapter``, ``lora``: the PEFT baselines of :mod:`rsitr.methods.peft`.
* ``rdb`` and its ablations: ``rdb-vea-only`` (``tsa_layers: none``), ``rdb-tsa-only``
  (``vea_layers: none``), ``rdb-symmetric`` (``symmetric: true``), ``rdb-no-cls``
  (``loss_cls: false``), ``rdb-no-consistency`` (``loss_consistency: false``),
  ``rdb-fixed-weights`` (``weighting: fixed``).

PEFT rows (adapter / lora / rdb*) train in ``model.mode: ${RSITR_PEFT_MODE:-heads}``: ``rsitr bench
rdb`` sets ``frozen`` on backbones of a random-init family (``clip:CONFIG``; only the method's
modules train) and ``heads`` otherwise -- the two-tower backbone's projection heads are random, so they must train along with
the adapters (its trunks stay frozen and their features are cached once per run folder).

The ``params`` measurement records per cell the trainable parameters and their share of the
model, the parameters the method *adds* to the backbone as loaded, the optimizer steps run and the
training loop's seconds (a row that hits ``time_budget`` first runs fewer steps).
"""
from __future__ import annotations

from typing import Any

from rsitr.bench.measurements import CellContext, Measurement, fmt_mean, keyword_check, register_measurement
from rsitr.models.registry import parse_spec

SUITE = "rdb-comparison"
DEFAULT_BACKBONE = "towers:efficientnet-lite0+minilm-l6"
EXTRA_ROWS = ("locked-image",)  # in the suite, run only when named


def default_peft_mode(backbone: str) -> str:
    """``model.mode`` of the PEFT rows for the backbone spec ``backbone`` (see the module doc)."""
    return "frozen" if parse_spec(backbone).random_init else "heads"


def plain_params(backbone) -> int:
    """Parameters of a backbone as loaded, plus the baseline method's own temperature when the
    backbone has none (as every trained row's total counts it)."""
    return sum(p.numel() for p in backbone.parameters()) + (1 if backbone.logit_scale is None else 0)


def _params_on_cell(ctx: CellContext, params: dict[str, Any]) -> dict[str, Any]:
    from rsitr.methods.factory import load

    rec = ctx.record
    n_train, n_total = int(rec["trainable_params"] or 0), int(rec["total_params"] or 0)
    if ctx.source == ctx.cfg.model.backbone:  # a cell that did not train: its model is the backbone as loaded
        base = n_total
    else:
        base = plain_params(load(ctx.cfg.model.backbone, quick_gelu=ctx.cfg.model.quick_gelu, embed_dim=ctx.cfg.model.embed_dim).backbone)
    hist = rec.get("history") or []
    return {"trainable_params": n_train, "total_params": n_total, "trainable_pct": 100.0 * n_train / n_total if n_total else None,
            "added_params": n_total - base, "steps": hist[-1]["global_step"] if hist else 0,
            "train_seconds": (rec.get("train_seconds") or 0.0) if hist else 0.0}  # the run's, resumed invocations included


def count(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _params_render(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | mode | trainable | % of total | added to the backbone | steps | loop s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        res = r.get("result") or {}
        lines.append(f"| {r['method']} | {r['mode']} | {count(res.get('trainable_params'))} | {fmt_mean(r, 'trainable_pct', digits=3)} | "
                     f"{count(res.get('added_params'))} | {fmt_mean(r, 'steps', digits=0)} | {fmt_mean(r, 'train_seconds', digits=0)} |")
    return lines


PARAMS = register_measurement(Measurement("params", "Parameters and budget", _params_render, on_cell=_params_on_cell,
                                          check=keyword_check("params")))  # takes no parameters
