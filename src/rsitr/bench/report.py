"""``rsitr bench report RUN_DIR``: the comparison table (mean +- std over seeds), efficiency
columns, published rows, and plots (matplotlib, PNG, embedded in the markdown).

``rsitr bench report RUN_DIR... --out DIR`` reports the cells of several run folders as one (cells
run side by side, one ``bench run`` per seed or method, since a run folder admits one run at a
time): the same cell in two folders, or seeds of one method trained with other settings, are
refused rather than averaged."""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rsitr.bench.measurements import get_measurement, mean_results, mean_std, std_results
from rsitr.bench.suite import _MOVABLE, _flatten, collect
from rsitr.models.registry import comparison_note
from rsitr.utils.io import atomic_write_json, atomic_write_text

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
PUBLISHED = Path(__file__).with_name("published.tsv")


def published_rows(dataset: str) -> list[dict[str, str]]:
    lines = [ln for ln in PUBLISHED.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    return [r for r in csv.DictReader(lines, delimiter="\t") if r["dataset"].lower() == dataset.lower()]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method): mean/std of every metric over the finished seeds, and of
    every measurement the cells recorded (``measurements.<name>``: ``seeds``, ``result`` the mean
    result, ``result_std``, the first ``error``)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    order: list[tuple[str, str]] = []
    for r in records:
        k = (r["dataset"], r["method"])
        if k not in order:
            order.append(k)
        if r.get("status") == "ok" and r.get("test"):
            groups[k].append(r)
        else:
            failed[k] += 1
    rows = []
    for k in order:
        rs = groups.get(k, [])
        row: dict[str, Any] = {"dataset": k[0], "method": k[1], "seeds": len(rs), "failed": failed.get(k, 0),
                               "published": next((r.get("published") for r in rs if r.get("published")), None)}
        if rs:
            for key in KEYS:
                row[key], row[key + "_std"] = mean_std([r["test"][key] for r in rs])
            for key in ("trainable_params", "train_seconds", "peak_rss_mb", "images_per_s", "texts_per_s", "query_ms_p50", "query_ms_p95"):
                vals = [r[key] for r in rs if r.get(key) is not None]
                row[key] = sum(vals) / len(vals) if vals else None
            for tie in ("pessimistic", "expected", "optimistic"):  # cells that carry every convention
                tr = [r["test_ties"][tie] for r in rs if tie in (r.get("test_ties") or {})]
                row[f"ties_{tie}"] = {key: mean_std([m[key] for m in tr]) for key in ("i2t_r1", "t2i_r1", "mR")} if tr else None
                row[f"ties_{tie}_n"] = len(tr)
            row["train_images"] = next((r["train_images"] for r in rs if r.get("train_images")), None)
            row["backbone"] = rs[0].get("backbone")
            row["mode"] = rs[0].get("mode")
            row["measurements"] = _summarize_measurements(rs)
            # a model trained on a mix of datasets (data.sources): each part's own test split
            parts = dict.fromkeys(k.split(":", 1)[0] for k in rs[0]["test"] if ":" in k)
            row["parts"] = {part: {key: mean_std([r["test"][f"{part}:{key}"] for r in rs]) for key in KEYS} for part in parts} or None
        rows.append(row)
    return rows


def _summarize_measurements(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in dict.fromkeys(n for r in records for n in (r.get("measurements") or {})):
        res = [r["measurements"][name] for r in records if name in (r.get("measurements") or {})]
        ok = [x for x in res if "error" not in x]
        out[name] = {"seeds": len(ok), "failed": len(res) - len(ok), "result": mean_results(ok), "result_std": std_results(ok),
                     "error": next((x["error"] for x in res if "error" in x), None)}
    return out


def render_measurements(drows: list[dict[str, Any]]) -> list[str]:
    """The sections of the measurements one dataset's cells recorded (a failed one: its error)."""
    out: list[str] = []
    for name in dict.fromkeys(n for r in drows for n in (r.get("measurements") or {})):
        m = get_measurement(name)
        rows = [{"method": r["method"], "mode": r.get("mode"), **r["measurements"][name]} for r in drows if name in (r.get("measurements") or {})]
        out += ["", f"### {m.title} (`{name}`)", ""]
        done = [r for r in rows if r["seeds"]]
        if done:
            out += m.render(done)
        for r in rows:
            if r["failed"]:
                out.append(f"- {r['method']}: {r['failed']} cell(s) failed this measurement: {r['error']}")
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _params(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def render(run_dir: Path, rows: list[dict[str, Any]], records: list[dict[str, Any]], plots: list[str],
           sources: list[Path] | None = None) -> str:
    suite = (run_dir / "suite.yaml").read_text(encoding="utf-8") if (run_dir / "suite.yaml").is_file() else ""
    env = json.loads((run_dir / "environment.json").read_text()) if (run_dir / "environment.json").is_file() else {}
    out = [f"# rsitr bench report: {run_dir.name}", ""]
    if sources:
        out += ["The cells of " + ", ".join(f"`{s}`" for s in sources) + " (fused rows, if any, stay in each folder's own report).", ""]
    if env:
        out += [f"Environment: rsitr {env.get('rsitr')}, torch {env.get('torch')}, Python {env.get('python')}, "
                f"{env.get('cpus')} CPUs ({env.get('device')}).", ""]
    codes: dict[str, int] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        code = (r.get("environment") or {}).get("code") or "not recorded"
        codes[code] = codes.get(code, 0) + 1
    if codes:
        out += ["Code the finished cells ran: " + ", ".join(f"{c} ({n} cell{'s' if n != 1 else ''})" for c, n in codes.items()) + ".", ""]
    out += ["Test split, the field's protocol (ties broken at random in expectation, see `rsitr.retrieval.metrics`); "
            "mean ± std over seeds; the best-validation checkpoint of each run.", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        drows = [r for r in rows if r["dataset"] == dataset]
        out += [f"## {dataset}", "",
                "| method | backbone (mode) | seeds | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR | trainable | train s | peak MB | img/s | query ms p50 |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in drows:
            if not r["seeds"]:
                out.append(f"| {r['method']} | - | 0 ({r['failed']} failed) | " + " | ".join("-" for _ in range(12)) + " |")
                continue
            cells = [f"{r[k]:.2f} ± {r[k + '_std']:.2f}" if r["seeds"] > 1 else f"{r[k]:.2f}" for k in KEYS]
            cells[-1] = f"**{cells[-1]}**"
            fail = f" (+{r['failed']} failed)" if r["failed"] else ""
            out.append(f"| {r['method']} | {r['backbone']} ({r['mode']}) | {r['seeds']}{fail} | " + " | ".join(cells) + " | "
                       f"{_params(r['trainable_params'])} | {_fmt(r['train_seconds'], 0)} | {_fmt(r['peak_rss_mb'], 0)} | "
                       f"{_fmt(r['images_per_s'], 1)} | {_fmt(r['query_ms_p50'], 3)} |")
        mixed = [r for r in drows if r.get("seeds") and r.get("parts")]
        if mixed:
            out += ["", "Trained on a mix of datasets (`data.sources`): the rows above are the mean over its parts; each part's "
                    "own test split, scored on its own:", "",
                    "| method | part | seeds | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR |",
                    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in mixed:
                for part, m in r["parts"].items():
                    cells = [f"{m[k][0]:.2f} ± {m[k][1]:.2f}" if r["seeds"] > 1 else f"{m[k][0]:.2f}" for k in KEYS]
                    out.append(f"| {r['method']} | {part} | {r['seeds']} | " + " | ".join(cells) + " |")
        tied = [r for r in drows if r.get("seeds") and r.get("ties_optimistic")]
        if tied:
            out += ["", "Tied scores (the same caption under several images gets exactly the same score) counted three ways: "
                    "never against the ground truth (optimistic), at random in expectation (the table above), always against it "
                    "(pessimistic). Code that breaks ties by sort order, as the papers' does, lands between the outer two, "
                    "depending on the order of the captions in the file.", "",
                    "| method | seeds | I2T R@1 pess. / exp. / opt. | T2I R@1 pess. / exp. / opt. | mR pess. / exp. / opt. |",
                    "|---|---:|---:|---:|---:|"]
            for r in tied:
                cells = [" / ".join(f"{r[f'ties_{t}'][k][0]:.2f}" for t in ("pessimistic", "expected", "optimistic")) for k in ("i2t_r1", "t2i_r1", "mR")]
                out.append(f"| {r['method']} | {r['ties_optimistic_n']} | " + " | ".join(cells) + " |")
        out += render_measurements(drows)
        pub_name = next((r["published"] for r in drows if r.get("published")), None)
        pub = published_rows(pub_name) if pub_name else []
        if pub:
            out += ["", f"Published on {pub_name} (from the papers; their evaluation code breaks ties by sort order):", "",
                    "| method | backbone | tuning | params | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR | source |",
                    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for p in sorted(pub, key=lambda p: float(p["mR"]), reverse=True):
                out.append(f"| {p['method']} | {p['backbone']} | {p['tuning']} | {p['params']} | " + " | ".join(p[k] for k in KEYS) + f" | {p['source']} |")
            notes = list(dict.fromkeys(n for n in (comparison_note(str(r.get("backbone", ""))) for r in drows) if n))
            if notes:  # what the backbones' families say about themselves
                train_imgs = next((r.get("train_images") for r in drows if r.get("train_images")), None)
                training = f"the {f'{train_imgs:,}' if train_imgs else 'training'} images of the training split"
                out += ["", *(n.format(training=training) for n in notes)]
        out.append("")
    if (run_dir / "fuse.md").is_file():  # the suite's fuse: section (rsitr.bench.fuse)
        out += ["## Fused rows", "", (run_dir / "fuse.md").read_text(encoding="utf-8").rstrip(), ""]
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        out += ["## Failed cells", ""]
        for r in failed:
            last = (r.get("error") or "").strip().splitlines()[-1:] or ["?"]
            out.append(f"- `{r.get('cell')}`: {last[0]}")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    if suite:
        out += ["## Suite", "", "```yaml", suite.rstrip(), "```", ""]
    return "\n".join(out)


def make_plots(run_dir: Path, rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    done = [r for r in rows if r["seeds"]]
    if not done:
        return []

    def save(fig, ax, name: str, xlabel: str, ylabel: str, title: str) -> str:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        return name

    def label(ax, r: dict[str, Any], x: float) -> None:
        ax.annotate(f"{r['dataset']}/{r['method']}", (x, r["mR"]), fontsize=7, xytext=(3, 3), textcoords="offset points")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in done:
        if r.get("trainable_params"):  # a row that trains nothing has no place on the log axis
            ax.errorbar(r["trainable_params"], r["mR"], yerr=r["mR_std"], fmt="o", capsize=3)
            label(ax, r, r["trainable_params"])
    ax.set_xscale("log")
    files = [save(fig, ax, "mr_vs_params.png", "trainable parameters", "test mR", "mR vs trainable parameters")]

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in done:
        if r.get("query_ms_p50") is not None:
            ax.plot(r["query_ms_p50"], r["mR"], "o")
            label(ax, r, r["query_ms_p50"])
    files.append(save(fig, ax, "latency_vs_mr.png", "query latency p50 (ms)", "test mR", "latency vs mR"))

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    curves = 0
    for rec in records:
        h = [x for x in rec.get("history", []) if x.get("val_mR") is not None]
        if h:
            ax.plot([x["epoch"] for x in h], [x["val_mR"] for x in h], label=rec["cell"], lw=1)
            curves += 1
    if 0 < curves <= 12:
        ax.legend(fontsize=6)
    files.append(save(fig, ax, "training_curves.png", "epoch", "validation mR", "training curves"))
    return files


def _suite_order(run_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in the order the run's suite lists its datasets and methods (methods it does not
    list, e.g. cells copied in from another run folder, after them), seeds ascending."""
    try:
        import yaml

        suite = yaml.safe_load((run_dir / "suite.yaml").read_text(encoding="utf-8")) or {}
        datasets, methods = list(suite.get("datasets") or {}), list(suite.get("methods") or {})
    except Exception:  # no or unreadable suite.yaml: by name
        datasets, methods = [], []

    def pos(names: list[str], name: str) -> int:
        return names.index(name) if name in names else len(names)

    return sorted(records, key=lambda r: (pos(datasets, r["dataset"]), r["dataset"], pos(methods, r["method"]), r["method"], r.get("seed", 0)))


def report(run_dir: str | Path, sources: list[str | Path] | None = None) -> str:
    """Write ``report.md`` / ``report.json`` (and the plots) of the run folder ``run_dir`` and return
    the markdown; with ``sources``, of the cells of those run folders together, written to
    ``run_dir`` (a folder of its own: not a run folder)."""
    run_dir = Path(run_dir)
    srcs = [Path(s) for s in sources] if sources else None
    if srcs:
        records = _merge(run_dir, srcs)
    else:
        records = collect(run_dir)
    if not records:
        from rsitr.utils.errors import RsitrError

        raise RsitrError(f"{run_dir}: no cells found (run `rsitr bench run` first)")
    records = _suite_order(run_dir, records)
    rows = summarize(records)
    plots = make_plots(run_dir, rows, records)
    md = render(run_dir, rows, records, plots, sources=srcs)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_json(run_dir / "report.json", {"rows": rows, "cells": [{k: v for k, v in r.items() if k not in ("config", "history")} for r in records],
                                                **({"sources": [str(s) for s in srcs]} if srcs else {})})
    return md


# settings a cell's record may differ in between seeds of one recipe: where things are (the suite's
# movable inputs), and how it ran
_NOT_RECIPE = ("seed", *_MOVABLE, "data.workers", "eval_batch_size", "device", "log_every", "save_every_steps")


def _merge(out: Path, sources: list[Path]) -> list[dict[str, Any]]:
    """The cells of ``sources`` as one list (checked: every source a run folder with cells, ``out``
    none of them; no cell in two folders; the seeds of a method trained with the same settings);
    ``out`` gets the suite (when the folders share it) and the first folder's environment."""
    from rsitr.utils.errors import RsitrError

    out = Path(out)
    for s in sources:
        if not s.is_dir():
            raise RsitrError(f"{s}: not a folder (a `rsitr bench run --out` folder was expected)")
        if out.resolve() == s.resolve():
            raise RsitrError(f"--out {out} is one of the run folders reported; give the merged report a folder of its own")
    if (out / "cells").exists():
        raise RsitrError(f"--out {out} is a bench run folder (it has cells/); give the merged report a folder of its own")
    seen: dict[tuple, Path] = {}
    records: list[dict[str, Any]] = []
    for s in sources:
        recs = collect(s)
        if not recs:
            raise RsitrError(f"{s}: no cells found (not a `rsitr bench run --out` folder, or none of its cells ran)")
        for r in recs:
            key = (r.get("dataset"), r.get("method"), r.get("seed"))
            if key in seen:
                raise RsitrError(f"cell {r.get('cell')} is in both {seen[key]} and {s}; report one of them")
            seen[key] = s
            records.append({**r, "run_folder": str(s)})
    recipes: dict[tuple, tuple[dict[str, Any], str]] = {}
    for r in records:
        if r.get("status") != "ok" or not r.get("config"):
            continue
        flat = {k: v for k, v in _flatten(r["config"]).items() if k not in _NOT_RECIPE}
        k = (r["dataset"], r["method"])
        if k not in recipes:
            recipes[k] = (flat, r["cell"])
            continue
        first, cell = recipes[k]
        diff = [f"{x}: {first.get(x)!r} vs {flat.get(x)!r}" for x in sorted(set(first) | set(flat)) if first.get(x) != flat.get(x)]
        if diff:
            raise RsitrError(f"{cell} and {r['cell']} trained with other settings ({'; '.join(diff[:5])}"
                             f"{'; ...' if len(diff) > 5 else ''}): their seeds would be averaged as one recipe. "
                             f"Report them apart, or give the methods other names")
    out.mkdir(parents=True, exist_ok=True)
    suites = [(s / "suite.yaml").read_text(encoding="utf-8") if (s / "suite.yaml").is_file() else None for s in sources]
    if suites[0] is not None and all(x == suites[0] for x in suites):
        atomic_write_text(out / "suite.yaml", suites[0])
    else:
        (out / "suite.yaml").unlink(missing_ok=True)
    env = next((s / "environment.json" for s in sources if (s / "environment.json").is_file()), None)
    if env is not None:
        atomic_write_text(out / "environment.json", env.read_text(encoding="utf-8"))
    return records
