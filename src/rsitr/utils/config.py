"""Dataclass configs from plain mappings (YAML, checkpoints): the one place unknown keys are
rejected. The training config (:mod:`rsitr.train.config`) and every method's options
(:class:`rsitr.methods.base.Method.Options`) are read through :func:`from_mapping`."""
from __future__ import annotations

import dataclasses
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
            kwargs[name] = value
    return cls(**kwargs)


__all__ = ["from_mapping"]
