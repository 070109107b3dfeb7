"""Measurements: what a bench cell records beyond its test metrics, and what the standalone
benchmarks (``rsitr bench ftf|search|encode``) print -- one registry, rendered by the one report.

A :class:`Measurement` has

* ``on_cell(ctx, params) -> dict | None``: run in a finished cell's process (after its training
  and test scoring, :mod:`rsitr.bench.cell`) when the suite declares it (``measurements: [name]``
  or ``{name: {param: value}}``); the result is stored in ``cell.json`` under
  ``measurements.<name>``. None: the measurement does not apply to that cell (e.g. the EBA filter
  on a cell without EBA). A measurement that raises is recorded as ``{"error": ...}`` and the cell
  stays finished.
* ``render(rows) -> list[str]``: the report's section, from one dataset's summary rows (each
  ``{"method", "mode", "seeds", "result"}``, ``result`` the mean over the method's seeds by
  :func:`mean_results`; ``result_std`` the standard deviation of its top-level numbers).
* ``run(**params) -> dict`` (optional): the measurement on inputs of its own, for the standalone
  commands, whose output is ``render_one(result)`` (the same table a report section holds).
* ``check(params)`` (optional): refuses bad parameters with one line before anything is loaded --
  when a suite is read, before ``rsitr bench measure`` touches a cell, and again in the cell.
  :func:`keyword_check` builds one from the keyword parameters of the function a measurement
  calls (unknown names, and values of another type than the parameter's default).

Built-in measurements: ``params`` (:mod:`rsitr.bench.rdb`), ``eba_filter``
(:mod:`rsitr.bench.iebaker`), ``ftf_speed`` (:mod:`rsitr.bench.ftf`), ``vector_search`` and
``index_build`` (:mod:`rsitr.bench.search`), ``encode`` (:mod:`rsitr.bench.throughput`),
``test_time`` (:mod:`rsitr.bench.testtime`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rsitr.utils.errors import RsitrError


@dataclass
class CellContext:
    """What a measurement sees of a finished cell: its folder, config, the loaded (backbone, method),
    the dataset and its test split, the no-grad engine, the cell's record so far, and ``source``: the
    checkpoint (run folder) to reload it from, or the backbone spec of a cell that did not train."""

    cell_dir: Path
    cfg: Any
    loaded: Any
    data: Any
    test: Any
    engine: Any
    record: dict[str, Any]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    name: str
    title: str
    render: Callable[[list[dict[str, Any]]], list[str]]
    on_cell: Callable[[CellContext, dict[str, Any]], dict[str, Any] | None] | None = None
    run: Callable[..., dict[str, Any]] | None = None
    render_one: Callable[[dict[str, Any]], str] | None = None
    check: Callable[[dict[str, Any]], None] | None = None


def _kind(default: Any, annotation: Any = None) -> str | None:
    """The parameter kind a default value implies (bool, int, number, str, a list of numbers), or,
    for a None default, its annotation (``float | None`` -> number)."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "str"
    if isinstance(default, (list, tuple)) and default and all(isinstance(x, int) and not isinstance(x, bool) for x in default):
        return "ints"
    if isinstance(default, (list, tuple)) and default and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
        return "numbers"
    if default is None and isinstance(annotation, str):
        parts = {a.strip() for a in annotation.split("|")} - {"None"}
        for names, kind in ((("bool",), "bool"), (("int",), "int"), (("float",), "number"), (("str", "Path"), "str"),
                            (("Sequence[int]", "list[int]", "tuple[int, ...]"), "ints"), (("Sequence[float]", "list[float]"), "numbers")):
            if parts and parts <= set(names) | {"Path"} and any(n in parts for n in names):
                return kind
    return None


def _fits(kind: str | None, v: Any, key: str = "") -> bool:
    """Whether ``v`` is a value of ``kind``: whole numbers >= 1 (a seed >= 0), finite numbers >= 0."""
    from rsitr.utils.config import in_range

    low = 0 if "seed" in key else 1
    whole = lambda x: isinstance(x, int) and in_range(x, low, None, False)  # noqa: E731
    finite = lambda x: in_range(x, 0, None, False)  # noqa: E731
    if kind is None or v is None:
        return True  # no kind known, or "not set" (the function's own default)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return whole(v)
    if kind == "number":
        return finite(v)
    if kind == "str":
        return isinstance(v, str)
    ok = whole if kind == "ints" else finite
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(ok(x) for x in v)


def keyword_check(name: str, *fns: Callable[..., Any], exclude: tuple[str, ...] = (), extra: dict[str, Any] | None = None
                  ) -> Callable[[dict[str, Any]], None]:
    """A ``check`` for a measurement whose parameters are keyword arguments of ``fns`` (less
    ``exclude``, the ones the measurement sets from the cell; ``extra``: more names with their
    defaults): an unknown name, or a value of another kind than the default's or annotation's (a
    whole number >= 1 -- a seed >= 0 --, a finite number >= 0, a string, a boolean, a non-empty
    list of such numbers), is one error line naming the parameter."""
    import inspect

    kinds: dict[str, str | None] = {k: _kind(v) for k, v in (extra or {}).items()}
    optional = {k for k, v in (extra or {}).items() if v is None}  # names that take null (their default's "not set")
    for fn in fns:
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in exclude and p.name not in kinds:
                default = None if p.default is p.empty else p.default
                kinds[p.name] = _kind(default, p.annotation)
                if default is None or "None" in str(p.annotation):
                    optional.add(p.name)

    def check(params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(kinds))
        if unknown:
            raise RsitrError(f"{name}: unknown parameter(s) {unknown}; it takes {sorted(kinds)}")
        for key, value in params.items():
            kind = kinds[key]
            if value is None and key not in optional:
                raise RsitrError(f"{name}: parameter {key} takes no null (leave it out for its default)")
            if not _fits(kind, value, key):
                low = 0 if "seed" in key else 1
                want = {"bool": "true or false", "int": f"a whole number >= {low}", "number": "a finite number >= 0", "str": "a string",
                        "ints": "a non-empty list of whole numbers >= 1", "numbers": "a non-empty list of finite numbers >= 0"}[kind]
                raise RsitrError(f"{name}: parameter {key} must be {want}, got {value!r}")

    return check


def check_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` of the measurement ``name`` checked (one error line, nothing loaded); returns them as a dict."""
    m = get_measurement(name)
    if params is not None and not isinstance(params, dict):
        raise RsitrError(f"{name}: parameters must be a mapping of name -> value, got {params!r}")
    params = dict(params or {})
    if m.check is not None:
        m.check(params)
    return params


_REGISTRY: dict[str, Measurement] = {}
_BUILTIN = ("rsitr.bench.rdb", "rsitr.bench.iebaker", "rsitr.bench.ftf", "rsitr.bench.search", "rsitr.bench.throughput",
            "rsitr.bench.testtime")


def register_measurement(m: Measurement) -> Measurement:
    if m.name in _REGISTRY and _REGISTRY[m.name] is not m:
        raise RsitrError(f"measurement {m.name!r} is registered twice")
    _REGISTRY[m.name] = m
    return m


def _load_builtin() -> None:
    import importlib

    for mod in _BUILTIN:
        importlib.import_module(mod)


def list_measurements() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_measurement(name: str) -> Measurement:
    _load_builtin()
    if name not in _REGISTRY:
        raise RsitrError(f"no measurement {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def run_on_cell(specs: dict[str, dict[str, Any]], ctx: CellContext) -> dict[str, Any]:
    """Every declared measurement on one finished cell: ``{name: result}`` (those that apply)."""
    import logging
    import traceback

    out: dict[str, Any] = {}
    for name, params in (specs or {}).items():
        m = get_measurement(name)
        try:
            res = m.on_cell(ctx, check_params(name, params))
        except Exception as exc:  # noqa: BLE001 - a failed measurement must not lose the trained cell
            logging.getLogger(__name__).warning("measurement %s failed on %s:\n%s", name, ctx.cell_dir, traceback.format_exc())
            res = {"error": f"{type(exc).__name__}: {exc}"}
        if res is not None:
            out[name] = res
    return out


# -- the one writer of a benchmark's result files -----------------------------------------------
def write_result(path: str | Path, result: Any, markdown: str | None = None) -> None:
    """A benchmark's result as JSON at ``path`` (atomically: a reader never sees half a file) and,
    when given, its markdown next to it (``path`` with the suffix ``.md``). Used by the standalone
    benchmarks that write files (``bench ftf``, ``bench serve``, ``bench fuse``); the suite's
    ``report.md`` / ``report.json`` are written by :func:`rsitr.bench.report.report`."""
    from rsitr.utils.io import atomic_write_json, atomic_write_text, jsonable

    path = Path(path)
    atomic_write_json(path, jsonable(result))
    if markdown is not None:
        atomic_write_text(path.with_suffix(".md"), markdown)


# -- summaries over seeds --------------------------------------------------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def mean_results(results: list[Any]) -> Any:
    """The mean of several results of one measurement (one per seed), leaf by leaf: numbers
    averaged (NaN and None left out; None when none is left), mappings by key, lists of equal
    length element by element; other values (names, settings) from the first result."""
    results = [r for r in results if r is not None]
    if not results:
        return None
    first = results[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for r in results if isinstance(r, dict) for k in r))
        return {k: mean_results([r.get(k) for r in results if isinstance(r, dict)]) for k in keys}
    if isinstance(first, list):
        same = [r for r in results if isinstance(r, list) and len(r) == len(first)]
        return [mean_results([r[i] for r in same]) for i in range(len(first))]
    if _number(first) or (isinstance(first, float) and math.isnan(first)):
        if all(isinstance(r, int) and not isinstance(r, bool) and r == first for r in results):
            return first  # a count or setting every seed shares
        nums = [float(r) for r in results if _number(r)]
        return sum(nums) / len(nums) if nums else None
    return first


def mean_std(xs: list[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (``ddof`` 1: sample, 0: population; 0 for a single value).
    Here, below the report and the suite runner, so that both and every measurement share it
    without importing each other."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - ddof)) if len(xs) > 1 else 0.0
    return m, sd


def std_results(results: list[dict[str, Any]]) -> dict[str, float]:
    """Sample standard deviation over seeds of each top-level number of the results (0 for one)."""
    out = {}
    for k in dict.fromkeys(k for r in results for k in r):
        vals = [float(r[k]) for r in results if _number(r.get(k))]
        if vals:
            out[k] = mean_std(vals)[1]
    return out


def fmt_mean(row: dict[str, Any], key: str, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of ``row["result"][key]`` (``-`` when absent; no ± for one seed)."""
    v = (row.get("result") or {}).get(key)
    if v is None:
        return "-"
    sd = (row.get("result_std") or {}).get(key, 0.0)
    return f"{v * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if row.get("seeds", 0) > 1 else "")


def per_method(render_one: Callable[[dict[str, Any]], str]) -> Callable[[list[dict[str, Any]]], list[str]]:
    """A report section of one table per method: ``render_one`` of its mean result over seeds."""

    def render(rows: list[dict[str, Any]]) -> list[str]:
        lines: list[str] = []
        for r in rows:
            lines += [f"{r['method']} ({r['seeds']} seed{'s' if r['seeds'] != 1 else ''}, mean):", "", render_one(r["result"]), ""]
        return lines[:-1]

    return render
