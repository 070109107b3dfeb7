"""RDB comparison: zero-shot / full fine-tuning / PEFT baselines (adapter, LoRA) / RDB and its
ablations, with one budget, from one call.

``run_comparison(data_path, out_dir, ...)`` trains every variant with the shared loop, the same
``epochs`` / ``max_steps`` / ``time_budget`` and seeds, and tests each best checkpoint on the
test split. Each row reports the test metrics (percent), the trainable parameters (and their
share of the model's total, and the parameters the method *adds* to the backbone), and the wall
time of training (feature caching + steps + validation; test evaluation excluded).

Variants (:data:`VARIANTS`):

* ``zero-shot``: no training, the backbone as loaded (the run's seed is set first, as the loop
  does). On the two-tower backbone the projection heads are randomly initialised, so this row is
  **near chance** by construction: it is the starting point, not a pretrained zero-shot CLIP.
* ``full``: the baseline method (symmetric InfoNCE) with ``model.mode: full`` -- on the towers
  both trunks train (expensive on CPU: every step runs and back-propagates the EfficientNet and
  MiniLM trunks on decoded images; the shared budget keeps it bounded). ``locked-image`` (LiT:
  text trunk + heads) is available as an extra variant, not in the default list.
* ``adapter``, ``lora``: the PEFT baselines of :mod:`rsitr.methods.peft`.
* ``rdb`` and its ablations: ``rdb-vea-only`` (``tsa_layers: none``), ``rdb-tsa-only``
  (``vea_layers: none``), ``rdb-symmetric`` (``symmetric: true``: a VEA of the same size in both
  towers), ``rdb-no-cls`` (``loss_cls: false``), ``rdb-no-consistency``
  (``loss_consistency: false``), ``rdb-fixed-weights`` (``weighting: fixed``).

PEFT rows (adapter / lora / rdb*) use ``peft_mode``: default ``frozen`` on ``clip:`` backbones
(only the method's modules train) and ``heads`` otherwise -- the two-tower backbone's projection
heads are random, so they must train along with the adapters (its trunks stay frozen and their
features are cached once in ``out_dir/cache``, shared by every row).

Outputs under ``out_dir``: one run folder per ``seed{S}/{variant}`` (a finished row is read back
when run again, an interrupted one resumed), ``comparison.json`` (rows + summary) and
``comparison.md`` (the table).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rsitr.bench import report
from rsitr.models.registry import parse_spec
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "towers:efficientnet-lite0+minilm-l6"
PEFT = "peft"  # placeholder for the PEFT mode of a row (resolved per backbone)
# variant -> (method name, model.mode or PEFT, method options)
VARIANTS: dict[str, tuple[str | None, str | None, dict[str, Any]]] = {
    "zero-shot": (None, None, {}),
    "full": ("baseline", "full", {}),
    "locked-image": ("baseline", "locked-image", {}),
    "adapter": ("adapter", PEFT, {}),
    "lora": ("lora", PEFT, {}),
    "rdb": ("rdb", PEFT, {}),
    "rdb-vea-only": ("rdb", PEFT, {"tsa_layers": "none"}),
    "rdb-tsa-only": ("rdb", PEFT, {"vea_layers": "none"}),
    "rdb-symmetric": ("rdb", PEFT, {"symmetric": True}),
    "rdb-no-cls": ("rdb", PEFT, {"loss_cls": False}),
    "rdb-no-consistency": ("rdb", PEFT, {"loss_consistency": False}),
    "rdb-fixed-weights": ("rdb", PEFT, {"weighting": "fixed"}),
}
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "locked-image")
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
NUMBERS = METRICS + ("trainable_params", "trainable_pct", "added_params", "steps", "train_seconds")


def default_peft_mode(backbone: str) -> str:
    return "frozen" if parse_spec(backbone).family == "clip" else "heads"


def _zero_shot(cfg, run_dir: Path) -> dict[str, Any]:
    """Test metrics of the backbone as loaded (no training); written to ``result.json``."""
    from rsitr.data.captions import load_dataset
    from rsitr.methods.factory import load_model
    from rsitr.eval.evaluate import evaluate
    from rsitr.utils.distributed import resolve_device
    from rsitr.train.loop import seed_everything

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # as the loop does before building the model: same random heads as the trained rows' start
    data = load_dataset(cfg.data.path, format=cfg.data.format, image_root=cfg.data.image_root, labels=cfg.data.labels, skip_bad=cfg.data.skip_bad)
    model = load_model(cfg.model.backbone, device=str(device), quick_gelu=cfg.model.quick_gelu, embed_dim=cfg.model.embed_dim)
    total = sum(p.numel() for p in model.parameters())
    if model.logit_scale is None:
        total += 1  # the baseline method's own temperature, counted in the trained rows' totals
    test = evaluate(model, data.split(cfg.data.test_split), batch_size=cfg.eval_batch_size, workers=cfg.data.workers, device=device, progress=False)
    res = {"best_val": {}, "test": test, "seconds": round(time.perf_counter() - t0, 2), "trainable_params": 0, "total_params": total,
           "history": []}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "result.json", res)
    return res


def run_comparison(
    data_path: str | Path,
    out_dir: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    *,
    epochs: int = 10,
    max_steps: int | None = None,
    time_budget: float | None = None,
    seeds: Sequence[int] = (0,),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    peft_mode: str | None = None,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train and test the comparison variants; returns one row per (variant, seed) and writes
    ``comparison.json`` / ``comparison.md`` (rewritten after every row).

    ``overrides``: TrainConfig overrides (dotted keys, e.g. ``{"batch_size": 32, "lr": 1e-3}``)
    shared by every row; a row's own ``method.name`` / ``method.options`` / ``model.mode`` are
    applied after them. ``method_options``: extra options per method name (``{"lora": {"rank":
    4}}``), merged under the variant's own. ``peft_mode``: model.mode of the adapter / LoRA / RDB
    rows (default: see the module doc). A row that fails is recorded with its ``error`` and the
    comparison goes on.
    """
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(variants) if variants else list(DEFAULT_VARIANTS)
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise RsitrError(f"unknown variant(s) {bad}; available: {list(VARIANTS)}")
    pmode = peft_mode or default_peft_mode(backbone)
    base_total: int | None = None  # parameters of the plain backbone (+ baseline temperature): from the zero-shot row or a baseline row
    rows: list[dict[str, Any]] = []

    def write() -> None:
        atomic_write_json(out / "comparison.json", {"data": str(data_path), "backbone": backbone, "epochs": epochs, "max_steps": max_steps,
                                                    "time_budget": time_budget, "seeds": list(seeds), "peft_mode": pmode,
                                                    "overrides": overrides or {}, "method_options": method_options or {},
                                                    "rows": rows, "summary": summarize(rows)})
        atomic_write_text(out / "comparison.md", format_markdown(rows) + "\n")

    for seed in seeds:
        for v in names:
            method, mode, opts = VARIANTS[v]
            mode = pmode if mode == PEFT else mode
            opts = {**((method_options or {}).get(method or "", {})), **opts}
            run_dir = out / f"seed{seed}" / v
            ov: dict[str, Any] = {
                "data.path": str(data_path), "out_dir": str(run_dir), "model.backbone": backbone, "epochs": int(epochs),
                "max_steps": max_steps, "time_budget": time_budget, "seed": int(seed), "cache_dir": str(out / "cache"),
            }
            ov.update(overrides or {})
            ov.update({"method.name": method or "baseline", "method.options": opts})
            if mode is not None:
                ov["model.mode"] = mode
            row: dict[str, Any] = {"variant": v, "seed": int(seed), "method": method or "none", "mode": mode or "-", "options": opts}
            res_path = run_dir / "result.json"
            t0 = time.perf_counter()
            try:
                cfg = TrainConfig().override(ov)
                if res_path.is_file() and (method is None or (run_dir / "checkpoint_best.pt").is_file()):
                    res = json.loads(res_path.read_text())
                    log.info("%s seed %d: done (read back)", v, seed)
                elif method is None:
                    log.info("%s seed %d: evaluating the backbone as loaded ...", v, seed)
                    res = _zero_shot(cfg, run_dir)
                else:
                    log.info("%s seed %d: training %s (mode %s) ...", v, seed, method, mode)
                    train(cfg, resume=(run_dir / "checkpoint_last.pt").is_file(), progress=progress)
                    res = json.loads(res_path.read_text())
                hist = res.get("history") or []
                n_train, n_total = int(res.get("trainable_params") or 0), int(res.get("total_params") or 0)
                if base_total is None and method in (None, "baseline"):
                    base_total = n_total
                row.update({k: (res.get("test") or {}).get(k) for k in METRICS})
                row.update({
                    "trainable_params": n_train, "total_params": n_total,
                    "trainable_pct": 100.0 * n_train / n_total if n_total else None,
                    "steps": hist[-1]["global_step"] if hist else 0,
                    "train_seconds": hist[-1]["seconds"] if hist else 0.0,
                    "seconds": res.get("seconds"),
                    "best_epoch": (res.get("best_val") or {}).get("epoch"),
                })
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                log.exception("%s seed %d failed", v, seed)
                row["error"] = f"{type(exc).__name__}: {exc}"
            log.info("%s seed %d: test mR %s (%.0fs)", v, seed, row.get("mR"), time.perf_counter() - t0)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            write()
    if base_total is not None:
        for r in rows:
            if r.get("total_params"):
                r["added_params"] = r["total_params"] - base_total
    write()
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each variant's numbers (failed rows left out)."""
    out = report.summarize(rows, "variant", NUMBERS)
    for s in out:
        first = next(r for r in rows if r["variant"] == s["variant"])
        s["method"], s["mode"] = first["method"], first["mode"]
    return out


def _count(n: float) -> str:
    n = float(n)
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison table: test metrics (mean ± std over seeds), trainable parameters (count,
    % of the model), parameters added to the backbone, optimizer steps run and training seconds
    (a row that hits ``time_budget`` first runs fewer steps)."""
    summ = summarize(rows)
    n_seeds = max((s["seeds"] for s in summ), default=0)

    def cell(s, k, d=2):
        if k not in s:
            return "-"
        m, sd = s[k], s.get(k + "_std", 0.0)
        return f"{m:.{d}f}" + (f" ± {sd:.{d}f}" if n_seeds > 1 else "")

    lines = ["| variant | mode | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR | trainable | % of total | added | steps | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summ:
        if not s["seeds"]:
            lines.append(f"| {s['variant']} | {s['mode']} | failed: {s.get('error', '?')} |" + " |" * 11)
            continue
        params = [_count(s["trainable_params"]) if "trainable_params" in s else "-", cell(s, "trainable_pct", 3),
                  _count(s["added_params"]) if "added_params" in s else "-", cell(s, "steps", 0), cell(s, "train_seconds", 0)]
        lines.append("| " + " | ".join([s["variant"], s["mode"]] + [cell(s, k) for k in METRICS] + params) + " |")
    return "\n".join(lines)
