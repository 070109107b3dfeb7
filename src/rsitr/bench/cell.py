"""One bench cell, run as ``python -m rsitr.bench.cell CELL_DIR`` (by ``rsitr bench run``), and
measurements added to finished cells later (``rsitr bench measure``, :func:`measure_run`).

Reads ``CELL_DIR/spec.json``, trains with the shared loop (resuming an interrupted run; a cell
with ``"train": false`` scores the backbone as loaded), then measures on the test split: metrics,
encoding throughput (images/s, texts/s) and text->image query latency over the encoded split, and
the suite's declared measurements (:mod:`rsitr.bench.measurements`); writes
``CELL_DIR/result.json``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def run(cell_dir: Path, progress: bool = True) -> dict:
    import torch

    from rsitr.bench.measurements import CellContext, run_on_cell
    from rsitr.bench.suite import environment, test_split
    from rsitr.eval.evaluate import encode_dataset, evaluate_ties
    from rsitr.train.config import TrainConfig

    spec = json.loads((cell_dir / "spec.json").read_text())
    cfg = TrainConfig().override(spec["overrides"])
    t0 = time.perf_counter()
    trained = _train(cfg, progress) if spec.get("train", True) else _as_loaded(cfg)
    wall_seconds = time.perf_counter() - t0
    # a resumed cell (or one found finished, scored again) counts its earlier processes' training too
    train_seconds = trained.get("run_seconds") or wall_seconds
    loaded = trained["loaded"]

    # efficiency on the test split with the best checkpoint
    from rsitr.train.data import load_training_data

    data = load_training_data(cfg.data)
    test = test_split(cfg, data)
    model = loaded.backbone
    engine = _engine(model, cfg)
    test_ties = evaluate_ties(model, test, method=loaded.method, batch_size=cfg.eval_batch_size, progress=False, engine=engine)
    t1 = time.perf_counter()
    enc = encode_dataset(model, test, batch_size=cfg.eval_batch_size, progress=False, engine=engine)
    enc_seconds = time.perf_counter() - t1
    texts, _ = test.texts()
    t2 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            engine.encode_text(model.tokenize(texts[i : i + 64]))
    text_seconds = time.perf_counter() - t2
    lat = []
    imgs = enc.images
    for j in range(min(200, len(texts))):  # query = ranking all test images for one embedded text
        q = enc.texts[j : j + 1]
        s = time.perf_counter()
        torch.topk(q @ imgs.t(), k=min(10, imgs.shape[0]))
        lat.append((time.perf_counter() - s) * 1000)
    history = [{"epoch": h["epoch"], "global_step": h.get("global_step"), "seconds": h.get("seconds"), "loss": h.get("loss"),
                "val_mR": h.get("val", {}).get("mR")} for h in trained["history"]]
    rec = {
        "cell": spec["cell"], "dataset": spec["dataset"], "method": spec["method"], "seed": spec["seed"], "published": spec.get("published"),
        "status": "ok", "test": test_ties["expected"], "test_ties": test_ties, "best_val": trained["best"],
        "trainable_params": trained["trainable_params"], "total_params": trained["total_params"], "train_seconds": round(train_seconds, 1),
        "train_wall_seconds": round(wall_seconds, 1),
        "train_images": len(data.split(cfg.data.train_split)),
        "images_per_s": round(len(test) / max(enc_seconds, 1e-9), 1) if len(test) else None,
        "texts_per_s": round(len(texts) / max(text_seconds, 1e-9), 1) if texts else None,
        "query_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
        "query_ms_p95": round(float(np.percentile(lat, 95)), 3) if lat else None,
        "backbone": cfg.model.backbone, "mode": cfg.model.mode if spec.get("train", True) else "-", "engine": engine.kind,
        "history": history, "environment": environment(), "config": cfg.to_dict(),
    }
    if spec.get("measurements"):
        ctx = CellContext(cell_dir, cfg, loaded, data, test, engine, rec, trained["source"], extra={"progress": progress})
        rec["measurements"] = run_on_cell(spec["measurements"], ctx)
    return rec


def _train(cfg, progress: bool) -> dict:
    """Train the cell (resuming an interrupted run); the test split is scored afterwards, from the
    best checkpoint (every tie convention)."""
    from rsitr.methods.factory import load
    from rsitr.train.loop import train

    result = train(cfg, resume=True, progress=progress, evaluate_test=False)
    return {"loaded": load(str(result.out_dir)), "history": result.history, "best": result.best, "trainable_params": result.trainable_params,
            "total_params": result.total_params, "source": str(result.out_dir), "run_seconds": result.run_seconds}


def _as_loaded(cfg) -> dict:
    """A cell that does not train (``train: false``): the backbone as loaded, seeded first as the
    training loop seeds it (on the two-tower backbone the projection heads are random: such a row
    is near chance, the starting point of the trained rows). Its parameters count the baseline
    method's temperature when the backbone has none, as the trained rows' totals do."""
    from rsitr.methods.factory import load
    from rsitr.train.loop import seed_everything
    from rsitr.utils.distributed import resolve_device

    seed_everything(cfg.seed)
    loaded = load(cfg.model.backbone, device=str(resolve_device(cfg.device)), quick_gelu=cfg.model.quick_gelu, embed_dim=cfg.model.embed_dim)
    total = sum(p.numel() for p in loaded.backbone.parameters()) + (1 if loaded.backbone.logit_scale is None else 0)
    return {"loaded": loaded.eval(), "history": [], "best": {}, "trainable_params": 0, "total_params": total, "source": cfg.model.backbone}


def _engine(model, cfg):
    """The run's no-grad engine (the exported graphs are shared with its training)."""
    from rsitr.models.engine import engine_for

    return engine_for(model, cfg.inference.engine, cache_dir=cfg.inference.onnx_cache)


def _finished_cell(cell_dir: Path) -> tuple[dict, dict, Any]:
    """``(cell.json, spec.json, TrainConfig)`` of a finished cell, else an RsitrError naming the folder."""
    from rsitr.train.config import TrainConfig
    from rsitr.utils.errors import RsitrError

    if not (cell_dir / "cell.json").is_file() or not (cell_dir / "spec.json").is_file():
        raise RsitrError(f"{cell_dir}: not a bench cell folder (no cell.json / spec.json)")
    rec = json.loads((cell_dir / "cell.json").read_text())
    if rec.get("status") != "ok":
        raise RsitrError(f"{cell_dir}: not a finished cell (status {rec.get('status')!r})")
    spec = json.loads((cell_dir / "spec.json").read_text())
    return rec, spec, TrainConfig().override(spec["overrides"])


def _add_to_records(cell_dir: Path, update) -> None:
    """``update(record)`` applied to the cell's ``cell.json`` and ``result.json``, each written atomically."""
    from rsitr.utils.io import atomic_write_json

    for name in ("cell.json", "result.json"):
        if (cell_dir / name).is_file():
            r = json.loads((cell_dir / name).read_text())
            update(r)
            atomic_write_json(cell_dir / name, r)


def add_ties(cell_dir: Path) -> dict:
    """Score a finished cell's best checkpoint on test under every tie convention and add them to
    its records (``test_ties``), for cells run before the records carried them."""
    from rsitr.bench.suite import test_split
    from rsitr.eval.evaluate import evaluate_ties
    from rsitr.methods.factory import load

    rec, _, cfg = _finished_cell(cell_dir)
    loaded = load(str(cell_dir / "run"))
    rec["test_ties"] = evaluate_ties(loaded.backbone, test_split(cfg), method=loaded.method, batch_size=cfg.eval_batch_size, progress=False,
                                     engine=_engine(loaded.backbone, cfg))
    _add_to_records(cell_dir, lambda r: r.__setitem__("test_ties", rec["test_ties"]))
    return rec


def add_measurement(cell_dir: Path, name: str, params: dict | None = None, *, progress: bool = False) -> dict:
    """Run the measurement ``name`` on a finished cell (its best checkpoint, as the cell's own
    process would have after training) and add the result to its records
    (``measurements.<name>``); for cells whose suite did not declare it. Returns the result (a
    failed measurement: ``{"error": ...}``, recorded too)."""
    from rsitr.bench.measurements import CellContext, check_params, run_on_cell
    from rsitr.bench.suite import test_split
    from rsitr.methods.factory import load
    from rsitr.train.data import load_training_data

    params = check_params(name, params)  # an unknown name or a bad parameter fails before anything is loaded
    rec, spec, cfg = _finished_cell(cell_dir)
    source = str(cell_dir / "run") if spec.get("train", True) else cfg.model.backbone
    loaded = load(source) if spec.get("train", True) else _as_loaded(cfg)["loaded"]
    data = load_training_data(cfg.data)
    ctx = CellContext(cell_dir, cfg, loaded, data, test_split(cfg, data), _engine(loaded.backbone, cfg), rec, source,
                      extra={"progress": progress})
    result = run_on_cell({name: params}, ctx).get(name)
    if result is None:
        return {}
    earlier = (rec.get("measurements") or {}).get(name)
    if "error" in result and isinstance(earlier, dict) and "error" not in earlier:
        return result  # a failed --again keeps the cell's earlier result: nothing measured is lost
    _add_to_records(cell_dir, lambda r: r.setdefault("measurements", {}).__setitem__(name, result))
    return result


def measure_run(out: Path, name: str, params: dict[str, Any] | None = None, *, methods: list[str] | None = None, again: bool = False,
                progress: bool = True) -> list[dict[str, Any]]:
    """``rsitr bench measure``: the measurement ``name`` on every finished cell of the run folder
    ``out`` that does not have it yet (``again``: on every one; ``methods``: only these), each
    added to the cell's records (:func:`add_measurement`; a failure never replaces a result the cell
    had); the folder is locked as a ``bench run`` locks it; bad parameters are refused first. Returns ``[{"cell", "status": "added"|"had"|"error"|"does not apply", ...}]``."""
    from rsitr.bench.measurements import check_params
    from rsitr.bench.suite import _exclusive
    from rsitr.utils.errors import RsitrError

    params = check_params(name, params)  # before any cell is looked at, even those that have it
    out = Path(out)
    if not out.is_dir() or not list(out.glob("cells/*/*/seed*/cell.json")):
        raise RsitrError(f"{out}: not a bench run folder with finished cells (cells/*/*/seed*/cell.json)")
    done = []
    with _exclusive(out / ".lock"):
        cells = [p.parent for p in sorted(out.glob("cells/*/*/seed*/cell.json"))]
        if methods:
            have = {json.loads((c / "cell.json").read_text()).get("method") for c in cells}
            if not set(methods) & have:
                raise RsitrError(f"{out}: no cells of the method(s) {methods}; it has {sorted(m for m in have if m)}")
        for i, cdir in enumerate(cells, 1):
            rec = json.loads((cdir / "cell.json").read_text())
            key = rec.get("cell", str(cdir.relative_to(out)))
            if rec.get("status") != "ok" or (methods and rec.get("method") not in methods):
                continue
            if name in (rec.get("measurements") or {}) and not again and "error" not in rec["measurements"][name]:
                print(f"[{i}/{len(cells)}] {key}: has {name}", flush=True)
                done.append({"cell": key, "status": "had"})
                continue
            print(f"[{i}/{len(cells)}] {key}: measuring {name} ...", flush=True)
            t0 = time.perf_counter()
            res = add_measurement(cdir, name, params, progress=progress)
            status = "error" if "error" in res else "added" if res else "does not apply"
            print(f"    {status}: " + (res["error"] if status == "error" else json.dumps(res)) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            done.append({"cell": key, "status": status, "result": res})
    if not done:
        raise RsitrError(f"{out}: no finished cell{' of ' + ', '.join(methods) if methods else ''} to measure "
                         f"(bench run retries failed cells; `rsitr bench report {out}` lists them)")
    return done


_USAGE = "usage: python -m rsitr.bench.cell CELL_DIR [--quiet] [--add-ties] [--threads N] [--max-pixels N] [--parent PID]"


def die_with_parent(parent: int) -> None:
    """Ask the kernel (Linux) to send this process SIGTERM when ``parent`` (the ``bench run``
    process) dies, even by SIGKILL (``PR_SET_PDEATHSIG``); exit at once if it already has."""
    import ctypes
    import os
    import signal

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:  # the parent died before the request took effect (or this is not its child)
        print(f"python -m rsitr.bench.cell: error: --parent {parent} is not this process's parent (the `bench run` that "
              f"started it has stopped): the cell does not run", file=sys.stderr, flush=True)
        os._exit(1)


def _parse(argv: list[str]) -> dict:
    """The cell process's command line (``rsitr bench run`` writes it; argparse stays in ``cli/``):
    the cell folder, ``--quiet``, ``--add-ties``, the run's ``--threads`` / ``--max-pixels`` and
    ``--parent`` (the run's process id: the cell stops when that process dies)."""
    from rsitr.utils.errors import RsitrError

    opts: dict = {"cell_dir": None, "quiet": False, "add_ties": False, "threads": None, "max_pixels": None, "parent": None}
    it = iter(argv)
    for a in it:
        if a in ("--quiet", "--add-ties"):
            opts[a[2:].replace("-", "_")] = True
        elif a in ("--threads", "--max-pixels", "--parent"):
            value = next(it, None)
            if value is None or not value.isdigit() or int(value) < 1:
                raise RsitrError(f"{a} needs a whole number >= 1, got {value!r}; {_USAGE}")
            opts[a[2:].replace("-", "_")] = int(value)
        elif a.startswith("-") or opts["cell_dir"] is not None:
            raise RsitrError(f"unexpected argument {a!r}; {_USAGE}")
        else:
            opts["cell_dir"] = Path(a)
    if opts["cell_dir"] is None:
        raise RsitrError(f"no cell folder given; {_USAGE}")
    return opts


def main(argv: list[str] | None = None) -> int:
    import torch

    from rsitr.bench.suite import CELL_ERROR_PREFIX
    from rsitr.data.images import set_max_pixels
    from rsitr.utils.errors import RsitrError
    from rsitr.utils.io import atomic_write_json
    from rsitr.utils.logging import setup_logging

    try:
        opts = _parse(sys.argv[1:] if argv is None else argv)
    except RsitrError as exc:
        print(f"python -m rsitr.bench.cell: error: {exc}", file=sys.stderr)
        return 2
    if opts["parent"]:
        die_with_parent(opts["parent"])
    setup_logging(-1 if opts["quiet"] else 0)
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    if opts["max_pixels"]:
        set_max_pixels(opts["max_pixels"])
    cell_dir = opts["cell_dir"]
    if opts["add_ties"]:
        try:
            rec = add_ties(cell_dir)
        except RsitrError as exc:
            print(f"python -m rsitr.bench.cell: error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({t: round(m["mR"], 2) for t, m in rec["test_ties"].items()}))
        return 0
    try:
        rec = run(cell_dir, progress=not opts["quiet"])
    except RsitrError as exc:  # bad settings or inputs: one line (rsitr bench run records it as the cell's error)
        print(f"{CELL_ERROR_PREFIX}{exc}", file=sys.stderr)
        return 1
    atomic_write_json(cell_dir / "result.json", rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
