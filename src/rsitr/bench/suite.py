"""``rsitr bench run`` / ``rsitr bench report``: a matrix of (dataset x method x seed) cells.

A suite is a YAML file::

    name: ucm-towers
    description: ...
    base:                    # TrainConfig overrides shared by every cell (dotted or nested keys)
      model.backbone: towers:efficientnet-lite0+minilm-l6
      epochs: 30
    datasets:                # name -> overrides (at least data.path); a path may use ${VAR}
      ucm: {data.path: ${RSITR_UCM:-../shared/data/ucm-captions}, published: UCM}
    methods:                 # name -> overrides (``seeds:`` there limits that method's seeds;
      baseline: {method.name: baseline}   # ``train: false`` scores the backbone as loaded)
      rdb: {method.name: rdb, method.options: {loss_cls: true}}
    options:                 # optional: method.name -> options under every such cell's own
      lora: {rank: 4}
    measurements: [params]   # optional: measurements run on each finished cell (a list, or
    seeds: [0, 1, 2]         # name -> parameters; see rsitr.bench.measurements)
    fuse:                    # optional: after the cells, `rsitr bench fuse` on every seed whose
      members: [baseline, rdb]   # members all finished (rsitr.bench.fuse); choose, betas, dynamic

``method.options`` mappings merge (base, then the suite's ``options`` for the cell's method, then
the dataset's, then the method's own) instead of replacing each other.

Each cell trains in its own process (``python -m rsitr.bench.cell``) so a crash or an
out-of-memory kill fails that cell only, and its peak memory is measured. A cell's folder holds
the run (checkpoints, log) and ``cell.json`` (status, metrics, parameters, wall time, peak RSS,
encoding throughput, query latency, environment). Finished cells are skipped when the suite is
run again; failed cells are retried. Frozen-trunk features are computed once and shared by
every cell: in ``RUN_DIR/cache`` unless the suite sets ``cache_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsitr.models.registry import parse_spec
from rsitr.utils.errors import RsitrError
from rsitr.utils.io import atomic_write_json, atomic_write_text, jsonable, parse_yaml, read_text

log = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parent.parent / "configs" / "suites"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, missing: list[str] | None = None, variables: dict[str, str] | None = None) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` from ``variables``, else the environment; unset variables
    without a default are collected in ``missing`` (an error listing them all when ``missing`` is
    None)."""
    top = missing is None
    missing = [] if top else missing
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            got = (variables or {}).get(m.group(1), os.environ.get(m.group(1)))
            if got is None:
                if m.group(2) is None:
                    missing.append(m.group(1))
                    return m.group(0)
                return m.group(2)
            return got

        out: Any = _VAR.sub(sub, value)
    elif isinstance(value, dict):
        out = {k: _expand(v, missing, variables) for k, v in value.items()}
    elif isinstance(value, list):
        out = [_expand(v, missing, variables) for v in value]
    else:
        out = value
    if top and missing:
        _missing_vars(missing)
    return out


def _missing_vars(names: list[str]) -> None:
    names = sorted(set(names))
    raise RsitrError("suite needs the environment variable(s) " + ", ".join(names) + " (paths to your dataset folders / "
                     "checkpoints), e.g. " + " ".join(f"{n}=/path/to/..." for n in names))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys, except inside ``method.options`` (kept as a dict)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("method.options",) and not key.endswith(".options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class Cell:
    dataset: str
    method: str
    seed: int
    overrides: dict[str, Any]
    published: str | None = None
    train: bool = True  # False: the backbone as loaded is scored (a zero-shot row)

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/seed{self.seed}"


@dataclass
class Suite:
    name: str
    description: str
    cells: list[Cell]
    source: Path
    raw: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> parameters, run on every finished cell
    text: str = ""  # the suite as YAML, archived in the run folder
    fuse: dict[str, Any] | None = None  # the checked ``fuse:`` section


def find_suite(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (SUITES_DIR / f"{name_or_path}.yaml", SUITES_DIR / name_or_path):
        if cand.is_file():
            return cand
    shipped = sorted(x.stem for x in SUITES_DIR.glob("*.yaml"))
    raise RsitrError(f"no suite {name_or_path!r}: not a file, and not one of the shipped suites {shipped}")


def load_suite(name_or_path: str, *, seeds: list[int] | None = None, methods: list[str] | None = None,
               variables: dict[str, str] | None = None, sets: dict[str, Any] | None = None) -> Suite:
    """The suite of a YAML file or a shipped suite's name; ``variables`` take precedence over the
    environment in ``${VAR}`` expansions. ``sets`` (``rsitr bench run --set``): dotted training
    config keys put over the suite's base (a dataset's or method's own keys still win); the suite
    archived with the run then is the file with them in its base."""
    path = find_suite(name_or_path)
    text = read_text(path, "bench suite")
    raw = parse_yaml(text, path, "bench suite") or {}
    if not isinstance(raw, dict):
        raise RsitrError(f"{path}: a suite is a mapping with 'datasets' and 'methods', got {type(raw).__name__}")
    if sets:
        from rsitr.train.config import TrainConfig

        TrainConfig().override(dict(sets))  # an unknown key or a bad value fails here (from_dict checks), not in every cell
        if raw.get("base") is not None and not isinstance(raw["base"], dict):
            raise RsitrError(f"{path}: 'base' must be a mapping")
        raw["base"] = {**_flatten(raw.get("base") or {}), **sets}
        shown = " ".join(f"{k}={v}" for k, v in sets.items())
        text = f"# {path.name} run with --set {shown} (in the base below)\n" + yaml.safe_dump(raw, sort_keys=False)
    return build_suite(raw, path, text=text, seeds=seeds, methods=methods, variables=variables)


def build_suite(raw: dict[str, Any], path: Path, *, text: str | None = None, seeds: list[int] | None = None,
                methods: list[str] | None = None, variables: dict[str, str] | None = None) -> Suite:
    """The cells of a parsed suite (``path`` names it in errors and is archived with the run;
    ``text``: its YAML, default ``raw`` dumped)."""
    for key in ("datasets", "methods"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise RsitrError(f"{path}: needs a non-empty '{key}' mapping")
    # every unset variable the chosen cells need, reported at once
    chosen_m = list(raw["methods"]) if not methods else [m for m in methods if m in raw["methods"]]
    need: list[str] = []
    _expand({"base": raw.get("base"), "datasets": raw["datasets"], "methods": {m: raw["methods"][m] for m in chosen_m}}, need, variables)
    if need:
        _missing_vars(need)
    base = _flatten(_expand(raw.get("base") or {}, variables=variables))
    all_seeds = seeds if seeds is not None else list(raw.get("seeds") or [0])
    chosen = list(raw["methods"]) if not methods else methods
    unknown = [m for m in chosen if m not in raw["methods"]]
    if unknown:
        raise RsitrError(f"{path}: unknown method(s) {unknown}; the suite has {list(raw['methods'])}")
    shared_opts = raw.get("options") or {}
    if not isinstance(shared_opts, dict) or not all(isinstance(v, dict) for v in shared_opts.values()):
        raise RsitrError(f"{path}: 'options' must map method names to option mappings")
    cells = []
    for dname, dover in raw["datasets"].items():
        dover = _flatten(_expand(dover or {}, variables=variables))
        published = dover.pop("published", None)
        for mname in chosen:
            mover = _flatten(_expand(raw["methods"][mname] or {}, variables=variables))
            # a method may run fewer seeds than the suite (an expensive one), unless --seeds is given
            mseeds = mover.pop("seeds", None)
            trains = bool(mover.pop("train", True))
            over = {**base, **dover, **mover}
            method_name = over.get("method.name", "baseline")
            opts = {}
            for layer in (base.get("method.options"), shared_opts.get(method_name), dover.get("method.options"), mover.get("method.options")):
                opts.update(layer or {})
            if opts or "method.options" in over:
                over["method.options"] = opts
            for seed in (all_seeds if seeds is not None or mseeds is None else [int(x) for x in mseeds]):
                cells.append(Cell(dname, mname, int(seed), {**over, "seed": int(seed)}, published, trains))
    return Suite(raw.get("name", path.stem), raw.get("description", ""), cells, path, raw, _measurements(raw.get("measurements"), path),
                 text if text is not None else yaml.safe_dump(raw, sort_keys=False), _fuse_spec(raw.get("fuse"), raw["methods"], path))


FUSE_KEYS = {"members": list, "choose": bool, "betas": list, "dynamic": bool}


def _fuse_spec(spec: Any, methods: dict, path: Path) -> dict[str, Any] | None:
    """A suite's ``fuse:`` section: members (suite methods, at least one), ``choose`` (the
    subset chosen on val), ``betas``, ``dynamic`` (see :mod:`rsitr.bench.fuse`)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RsitrError(f"{path}: 'fuse' must be a mapping with 'members' (and optionally {sorted(set(FUSE_KEYS) - {'members'})})")
    for k, v in spec.items():
        if k not in FUSE_KEYS:
            raise RsitrError(f"{path}: unknown key fuse.{k}; known: {sorted(FUSE_KEYS)}")
        if not isinstance(v, FUSE_KEYS[k]):
            raise RsitrError(f"{path}: fuse.{k} must be a {FUSE_KEYS[k].__name__}, got {v!r}")
    members = spec.get("members") or []
    unknown = [m for m in members if m not in methods]
    if not members or unknown:
        raise RsitrError(f"{path}: fuse.members must name methods of the suite ({list(methods)}); got {members}")
    betas = spec.get("betas")
    if betas is not None and (not betas or not all(isinstance(b, (int, float)) and b > 0 for b in betas)):
        raise RsitrError(f"{path}: fuse.betas must be positive numbers, got {betas}")
    return dict(spec)


def _measurements(spec: Any, path: Path) -> dict[str, dict[str, Any]]:
    """A suite's ``measurements:`` (a list of names, or name -> parameters), checked against the
    registry."""
    from rsitr.bench.measurements import check_params, get_measurement

    if not spec:
        return {}
    items = {name: {} for name in spec} if isinstance(spec, list) else spec
    if not isinstance(items, dict):
        raise RsitrError(f"{path}: 'measurements' must be a list of names or a mapping of name -> parameters")
    out = {}
    for name, params in items.items():
        m = get_measurement(str(name))
        if m.on_cell is None:
            raise RsitrError(f"{path}: measurement {name!r} does not run on a cell")
        try:
            out[str(name)] = check_params(str(name), params)
        except RsitrError as exc:
            raise RsitrError(f"{path}: measurements: {exc}") from None
    return out


def prepare_synthetic(suite: Suite, out: Path) -> None:
    """Datasets declared as ``synth: {images: N, seed: S, noise_frac: F}`` are generated once
    under ``RUN_DIR/data/<name>`` (deterministic by seed) and their cells pointed at them."""
    from rsitr.data.synth import write_synth

    for name, spec in (suite.raw.get("datasets") or {}).items():
        if not isinstance(spec, dict) or "synth" not in spec:
            continue
        opts = dict(spec["synth"] or {})
        target = out / "data" / name
        ann = target / "dataset_synth.json"
        if not ann.is_file():
            print(f"generating synthetic dataset '{name}' ({opts}) ...", flush=True)
            ann = Path(write_synth(target, n_images=int(opts.get("images", 600)), seed=int(opts.get("seed", 0)),
                                   noise_frac=float(opts.get("noise_frac", 0.0))))
        for c in suite.cells:
            if c.dataset == name:
                c.overrides.pop("synth", None)
                c.overrides = {k: v for k, v in c.overrides.items() if not k.startswith("synth.")}
                c.overrides["data.path"] = str(ann)


def check_inputs(suite: Suite) -> None:
    """Every dataset path and checkpoint path a suite needs (backbone checkpoints, distillation
    teachers), then every cell's settings (keys, types, ranges, the method's options), checked
    before anything runs."""
    from rsitr.models.checkpoint import TrainCheckpoint
    from rsitr.train.config import TrainConfig
    from rsitr.utils.errors import CheckpointError

    missing, bad = [], {}
    for c in suite.cells:
        sources = c.overrides.get("data.sources")
        if sources:
            for src in sources:
                p = src.get("path") if isinstance(src, dict) else src
                if not p or not Path(p).exists():
                    missing.append(f"dataset '{c.dataset}': data.sources path {p!r}")
        else:
            p = c.overrides.get("data.path")
            if not p or not Path(p).exists():
                missing.append(f"dataset '{c.dataset}': data.path {p!r}")
        b = str(c.overrides.get("model.backbone", ""))
        if b and parse_spec(b).is_path and not Path(b).exists():
            missing.append(f"dataset '{c.dataset}' method '{c.method}': checkpoint {b!r}")
        try:  # the cell's settings as its process will read them: keys, types, ranges, method options
            cfg = TrainConfig().override(c.overrides)
        except RsitrError as exc:
            bad.setdefault(str(exc), []).append(c.key)
            continue
        for t in cfg.distill.teachers:
            try:
                TrainCheckpoint.resolve(t)
            except CheckpointError as exc:
                missing.append(f"dataset '{c.dataset}' method '{c.method}': distill.teachers {t!r} ({exc})")
    if missing:
        raise RsitrError(f"suite {suite.name} cannot run; missing:\n  " + "\n  ".join(sorted(set(missing))))
    if bad:
        raise RsitrError(f"suite {suite.name} cannot run; bad settings:\n  " + "\n  ".join(
            f"{', '.join(keys[:3])}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}: {msg}" for msg, keys in bad.items()))


def environment() -> dict[str, Any]:
    """What a run or cell ran on, with ``code``: the commit of the checkout rsitr runs from
    (``-dirty`` with uncommitted changes; None outside a checkout), so each number names its code."""
    import torch

    from rsitr.utils.version import __version__, git_commit

    from rsitr.data.images import max_pixels

    return {"rsitr": __version__, "code": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "max_pixels": max_pixels(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def test_split(cfg, data=None):
    """The test split a cell of config ``cfg`` is scored on (its ``data.subset`` applied; a mix of
    datasets keeps its parts, each scored on its own)."""
    from rsitr.train.data import load_training_data

    if data is None:
        data = load_training_data(cfg.data)
    return data.split(cfg.data.test_split)


def run_suite(suite: Suite, out: Path, *, progress: bool = True, timeout: float | None = None) -> list[dict[str, Any]]:
    """Run every cell not finished yet; returns the cell records (finished and failed).

    One run folder serves one ``bench run`` at a time (a lock file; a second run on the same
    folder is refused instead of training the same cells twice)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out / ".lock"), _terminate_as_exit():
        return _run_suite(suite, out, progress=progress, timeout=timeout)


class _terminate_as_exit:
    """SIGTERM (``kill``, a batch scheduler's stop) raises ``SystemExit`` in the main thread for the
    duration of the block, so the running cell's process is stopped with it (see
    ``_run_cell_process``) instead of training on unsupervised after the folder's lock is gone."""

    def __enter__(self):
        import signal
        import threading

        self.prev = None
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGTERM, _raise_exit)
        return self

    def __exit__(self, *exc):
        import signal

        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)
        return False


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


class _exclusive:
    """An advisory ``flock`` on ``path`` for the duration of the block (released by the OS if the
    process dies)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise RsitrError(f"{self.path.parent}: another `rsitr bench run` is using this folder; wait for it or stop it") from None
        return self

    def __exit__(self, *exc):
        self.fh.close()  # closing releases the lock
        return False


def _run_suite(suite: Suite, out: Path, *, progress: bool, timeout: float | None) -> list[dict[str, Any]]:
    prepare_synthetic(suite, out)
    check_inputs(suite)
    _refuse_changed_cells(suite, out)  # before the folder's suite.yaml is replaced: a refused run changes nothing
    atomic_write_text(out / "suite.yaml", suite.text or suite.source.read_text(encoding="utf-8"))
    atomic_write_json(out / "environment.json", environment())
    records = []
    for i, cell in enumerate(suite.cells, 1):
        cdir = out / "cells" / cell.dataset / cell.method / f"seed{cell.seed}"
        rec_path = cdir / "cell.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            if rec.get("status") == "ok":
                print(f"[{i}/{len(suite.cells)}] {cell.key}: done (skipped)", flush=True)
                records.append(rec)
                continue
        cdir.mkdir(parents=True, exist_ok=True)
        spec = {"cell": cell.key, "dataset": cell.dataset, "method": cell.method, "seed": cell.seed, "published": cell.published,
                "train": cell.train, "measurements": suite.measurements,
                "overrides": {"cache_dir": str(out / "cache"), **cell.overrides, "out_dir": str(cdir / "run")}}
        atomic_write_json(cdir / "spec.json", spec)
        print(f"[{i}/{len(suite.cells)}] {cell.key}: {'training' if cell.train else 'scoring the backbone as loaded'} ...", flush=True)
        t0 = time.perf_counter()
        rec = _run_cell_process(cdir, progress=progress, timeout=timeout)
        rec.setdefault("wall_seconds", round(time.perf_counter() - t0, 1))
        atomic_write_json(rec_path, rec)
        if rec["status"] == "ok":
            print(f"    test mR {rec['test']['mR']:.2f}  ({rec['wall_seconds']:.0f}s, peak {rec.get('peak_rss_mb', 0):.0f} MB)", flush=True)
        else:
            print(f"    FAILED: {rec.get('error', '?').splitlines()[-1] if rec.get('error') else '?'}", flush=True)
        records.append(rec)
    return records


# where a cell's inputs may move without changing what it trains
_MOVABLE = ("cache_dir", "out_dir", "data.path")


def _refuse_changed_cells(suite: Suite, out: Path) -> None:
    """A finished cell is skipped when the suite runs again; if the suite (or ``--set``) now gives
    that cell other settings, skipping it would mix two recipes in one report: refused, every such
    cell named, before anything runs."""
    changed = []
    for cell in suite.cells:
        cdir = out / "cells" / cell.dataset / cell.method / f"seed{cell.seed}"
        rec, spec = cdir / "cell.json", cdir / "spec.json"
        if not (rec.is_file() and spec.is_file()):
            continue
        try:
            if json.loads(rec.read_text()).get("status") != "ok":
                continue  # a failed cell runs again with the new settings
            old = json.loads(spec.read_text()).get("overrides") or {}
        except (OSError, ValueError):
            continue
        new = json.loads(json.dumps(jsonable(cell.overrides)))
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted((set(old) | set(new)) - set(_MOVABLE))
                if old.get(k) != new.get(k)]
        if diff:
            changed.append(f"{cell.key} ({'; '.join(diff)})")
    if changed:
        raise RsitrError(f"{out} holds finished cells that ran with other settings than the suite gives them now: "
                         + ", ".join(changed) + ". Run with another --out, or delete those cells' folders to run them again")


CELL_ERROR_PREFIX = "rsitr: error: "  # a cell process's last line when it refuses its settings or inputs (rsitr.bench.cell)


def _run_cell_process(cdir: Path, *, progress: bool, timeout: float | None) -> dict[str, Any]:
    import torch

    from rsitr.data.images import max_pixels

    # the process-wide settings of this run (rsitr --threads, --max-pixels) hold in the cell's process too
    # --parent: the cell asks the kernel for SIGTERM when this process dies (even by SIGKILL); it does so
    # itself rather than in a preexec_fn, which would make Popen fork() instead of vfork(): fork() runs the
    # parent's atfork handlers, and gRPC's (pymilvus, Ray) can crash the child when its threads are busy
    cmd = [sys.executable, "-m", "rsitr.bench.cell", str(cdir), "--threads", str(torch.get_num_threads()),
           "--max-pixels", str(max_pixels()), "--parent", str(os.getpid())] + ([] if progress else ["--quiet"])
    stderr_path = cdir / "stderr.log"
    (cdir / "result.json").unlink(missing_ok=True)
    base = json.loads((cdir / "spec.json").read_text())
    with open(stderr_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:  # Ctrl-C, SIGTERM (as SystemExit): the cell stops with the run
            proc.kill()
            proc.wait()
            raise
    result_path = cdir / "result.json"
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    if proc.returncode == 0 and result_path.is_file():
        rec = json.loads(result_path.read_text())
        rec["peak_rss_mb"] = round(peak, 1)
        return rec
    tail = stderr_path.read_text(encoding="utf-8", errors="replace")[-4000:].strip()
    last = tail.splitlines()[-1] if tail else ""
    # a refusal (bad settings, missing input) is its one line; a crash keeps the log's tail with its traceback
    error = last[len(CELL_ERROR_PREFIX):] if last.startswith(CELL_ERROR_PREFIX) else tail or f"exit code {proc.returncode}"
    return {**{k: base[k] for k in ("cell", "dataset", "method", "seed", "published")}, "status": "failed",
            "returncode": proc.returncode, "error": error, "peak_rss_mb": round(peak, 1)}


def collect(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("cells/*/*/seed*/cell.json"))]
