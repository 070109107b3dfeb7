"""The ``test_time`` measurement: a finished cell's best checkpoint on its test split with the two
options every trained run can take at evaluation time, alone and together (issue 28, item 1):

* ``--tta N``: each gallery image's embedding is the mean over N dihedral views
  (:mod:`rsitr.models.tta`); both directions of the protocol use the averaged embedding;
* QB-Norm (Bogolin et al., CVPR 2022, the inverted softmax of their Eq. 2-3;
  :mod:`rsitr.retrieval.qbnorm`) with the run's own training captions as the query bank, ``beta``
  as the shipped models use it (14, chosen on RSICD val).

Declared in a suite as ``measurements: [test_time]`` or ``{test_time: {tta: 8, beta: 14}}``; a
run whose cells ran without it gets it later with ``rsitr bench measure RUN_DIR test_time``. The
scores are the ones ``rsitr models evaluate`` gives for the same checkpoint (one function,
:func:`rsitr.bench.release.evaluate_model`): ``plain`` is the cell's own test score (the suite's
test mR), ``tta`` the same scoring over the averaged image embeddings. A method whose score is
more than the pooled cosine -- a re-ranker (iEBAKER's SAR), token or two-stage scoring (FTF, the
combination) -- is scored through its own scoring in both and gets no QB-Norm rows: QB-Norm
normalises a cosine matrix, and stacking it under another re-ranker is not a published method.
"""
from __future__ import annotations

import logging
from typing import Any

from rsitr.bench.measurements import CellContext, Measurement, fmt_mean, register_measurement
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

KEYS = ("plain", "tta", "qbnorm", "both")


def _eval_sets(cfg) -> list:
    """The cell's test split(s) as release evaluation sets, its training split as the bank."""
    from rsitr.bench.release import EvalSet

    bank = cfg.data.train_split
    if cfg.data.sources:
        return [EvalSet(label=str(s.get("name") or f"part{i}"), data=str(s["path"]), split=cfg.data.test_split, bank=bank,
                        format=str(s.get("format", "auto")), image_root=s.get("image_root"))
                for i, s in enumerate(cfg.data.sources)]
    return [EvalSet(label="test", data=cfg.data.path, split=cfg.data.test_split, bank=bank, format=cfg.data.format,
                    image_root=cfg.data.image_root)]


def _check(params: dict[str, Any]) -> None:
    """``tta`` 4 or 8, ``beta`` a positive finite number; nothing else (one line each)."""
    from rsitr.data.transforms import DIHEDRAL_VIEWS
    from rsitr.utils.config import in_range

    unknown = sorted(set(params) - {"tta", "beta"})
    if unknown:
        raise RsitrError(f"test_time: unknown parameter(s) {unknown}; it takes ['beta', 'tta']")
    tta, beta = params.get("tta", 8), params.get("beta", 14.0)
    if isinstance(tta, bool) or not isinstance(tta, int) or tta == 1 or tta not in DIHEDRAL_VIEWS:
        raise RsitrError(f"test_time: tta must be 4 or 8 (dihedral views of each image; 1 is the plain row), got {tta!r}")
    if not in_range(beta, 0, None, True):
        raise RsitrError(f"test_time: beta must be a positive number, got {beta!r}")


def measure(source: str, cfg, *, tta: int = 8, beta: float = 14.0, engine: str = "auto", progress: bool = False) -> dict[str, Any]:
    """``{"tta_views", "beta", "bank", "plain", "tta", "qbnorm", "both"}`` (test mR; with several
    datasets in the cell, ``"<name>:plain"`` ... per dataset)."""
    from rsitr.bench.release import evaluate_model

    _check({"tta": tta, "beta": beta})
    sets = _eval_sets(cfg)
    rows = evaluate_model(source, sets, ttas=(1, tta), qbnorm_beta=float(beta), engine=engine, progress=progress)
    out: dict[str, Any] = {"tta_views": tta, "beta": float(beta), "bank": cfg.data.train_split}
    for s in sets:
        prefix = "" if len(sets) == 1 else f"{s.label}:"
        for r in rows:
            if r["dataset"] != s.label:
                continue
            key = ("tta" if r["tta"] > 1 else "plain") if r["rerank"] == "none" else ("both" if r["tta"] > 1 else "qbnorm")
            out[prefix + key] = float(r["mR"])
    return out


def _on_cell(ctx: CellContext, params: dict[str, Any]) -> dict[str, Any] | None:
    if ctx.cfg.data.subset:
        log.warning("test_time: %s scores a data.subset of its splits; not measured (the full splits would differ)", ctx.cell_dir)
        return None
    return measure(ctx.source, ctx.cfg, tta=params.get("tta", 8), beta=float(params.get("beta", 14.0)), engine=ctx.cfg.inference.engine,
                   progress=bool(ctx.extra.get("progress", False)))


def _render(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0].get("result") or {}
    views, beta = first.get("tta_views", 8), first.get("beta", 14.0)
    # one column group per dataset of the cells ("" for a single dataset, "name:" for each of a mix)
    prefixes = list(dict.fromkeys(k.rpartition(":")[0] + ":" if ":" in k else "" for r in rows for k in (r.get("result") or {})
                                  if k.rpartition(":")[2] in KEYS))
    lines = [f"Test mR of each method's best checkpoint, by its own scoring (plain: the suite's test mR): plain, `--tta {views}` "
             f"(mean over {views} dihedral views of each image), QB-Norm (beta {beta:g}, the run's training captions as the query "
             "bank; methods scored by the pooled cosine only) and both; mean ± std over seeds.", ""]
    head = "| method | mode | seeds |" + "".join(f" {p}plain | {p}TTA {views} | {p}QB-Norm | {p}both |" for p in prefixes)
    lines += [head, "|---|---|---:|" + "---:|" * (4 * len(prefixes))]
    for r in rows:
        cells = "".join(f" {fmt_mean(r, p + k)} |" for p in prefixes for k in KEYS)
        lines.append(f"| {r['method']} | {r['mode']} | {r['seeds']} |{cells}")
    return lines


TEST_TIME = register_measurement(Measurement("test_time", "Test-time views and QB-Norm", _render, on_cell=_on_cell, check=_check))

__all__ = ["KEYS", "TEST_TIME", "measure"]
