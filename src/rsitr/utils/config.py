"""Dataclass configs from plain mappings (YAML, checkpoints): the one place unknown keys are
rejected. The training config (:mod:`rsitr.train.config`) and every method's options
(:class:`rsitr.methods.base.Method.Options`) are read through :func:`from_mapping`."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from rsitr.utils.errors import RsitrError


def from_mapping(cls, d: Mapping[str, Any] | None, where: str = "", *, what: str = "key"):
    """``cls(**d)`` for a dataclass ``cls``, nested dataclass fields built from nested mappings and
    lists turned into tuples; a key ``cls`` does not declare is an error naming ``where`` and
    every known key (``"<where>: unknown <what>(s) [...]; known: [...]"``). ``d`` is never modified."""
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        raise RsitrError(f"{where or cls.__name__}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise RsitrError(f"{where + ': ' if where else ''}unknown {what}(s) {unknown}; known: {sorted(fields)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved: no scalar checks
        hints = {}
    kwargs = {}
    for name, value in d.items():
        f = fields[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = from_mapping(sub, value or {}, f"{where}.{name}" if where else name, what=what)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        elif isinstance(value, dict):
            kwargs[name] = dict(value)
        else:
            kwargs[name] = _scalar(value, hints.get(name), f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    check_declared_ranges(obj, where or (what if what != "key" else cls.__name__))  # e.g. "RDB option vea_bottleneck must be ..."
    return obj


def in_range(v: Any, lo: float, hi: float | None, mode: bool | str) -> bool:
    """Whether ``v`` is a finite number in the range ``(lo, hi, mode)``: ``mode`` True excludes
    ``lo``, ``"hi_open"`` excludes ``hi``, False includes both; ``hi`` None: no upper bound."""
    import math

    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return (v > lo if mode is True else v >= lo) and (hi is None or (v < hi if mode == "hi_open" else v <= hi))


def describe_range(lo: float, hi: float | None, mode: bool | str) -> str:
    return f"{'>' if mode is True else '>='} {lo:g}" + (f" and {'<' if mode == 'hi_open' else '<='} {hi:g}" if hi is not None else "")


def check_declared_ranges(obj: Any, where: str) -> None:
    """The ranges a dataclass declares for its numeric fields (``RANGES: ClassVar[dict]``, ``name
    -> (low, high or None, mode)`` as :func:`in_range`; a list value: each item), and with
    ``FINITE = True`` every other float field finite: an error of one line naming ``where`` and
    the field. None values (unset) pass."""
    import math

    ranges = getattr(type(obj), "RANGES", None) or {}
    for name, (lo, hi, mode) in ranges.items():
        value = getattr(obj, name)
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if not in_range(v, lo, hi, mode):
                raise RsitrError(f"{where} {name} must be {describe_range(lo, hi, mode)}, got {value!r}")
    if getattr(type(obj), "FINITE", False):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name not in ranges and isinstance(v, float) and not math.isfinite(v):
                raise RsitrError(f"{where} {f.name} must be a finite number, got {v!r}")


_SCALARS = (bool, int, float, str)


def _scalar(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against a field annotated ``bool``/``int``/``float``/``str`` (or that
    ``| None``): an int is a float, a whole float is an int; anything else is an error naming the
    key (a YAML ``time_budget: abc`` used to fail deep inside the run). Other annotations pass."""
    optional = False
    args = typing.get_args(hint)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return value
        hint, optional = rest[0], True
    if hint not in _SCALARS:
        return value
    if value is None:
        if optional:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    want = hint.__name__ + (" or null" if optional else "")
    raise RsitrError(f"{key}: expected {want}, got {value!r}")


__all__ = ["check_declared_ranges", "describe_range", "from_mapping", "in_range"]
