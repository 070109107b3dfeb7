"""Every numeric option of every method, generated: read into a value in its declared range, or
refused with one RsitrError line naming the option -- the class of ``--set
method.options.vea_bottleneck=0`` (a ZeroDivisionError deep in RDB's adapter init) and of NaN
weights that trained silently."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsitr.methods.base import list_methods, method_class
from rsitr.utils.config import in_range
from rsitr.utils.errors import RsitrError


def _numeric_fields():
    out = []
    for name in list_methods():
        cls = method_class(name)
        opts = getattr(cls, "Options", None)
        if opts is None or not dataclasses.is_dataclass(opts):
            continue
        for f in dataclasses.fields(opts):
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) or f.name in getattr(opts, "RANGES", {}):
                out.append((name, f.name))
    return out


FIELDS = _numeric_fields()
NUMBERS = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 0.0, -1, 1e30, 2, 0.5, 1]))


def test_every_numeric_option_has_a_declared_range_or_is_held_finite():
    """An option with a numeric default is in its class's RANGES, or its class holds floats finite."""
    assert len(FIELDS) > 40
    for name, field in FIELDS:
        opts = method_class(name).Options
        assert field in getattr(opts, "RANGES", {}) or getattr(opts, "FINITE", False), (name, field)


@settings(max_examples=600, deadline=None)
@given(which=st.sampled_from(FIELDS), value=NUMBERS)
def test_a_generated_numeric_option_is_in_range_or_refused_in_one_line(which, value):
    name, field = which
    cls = method_class(name)
    try:
        opts = cls.parse_options({field: value})
    except RsitrError as exc:
        assert field in str(exc) and "\n" not in str(exc)
        return
    got = getattr(opts, field)
    ranges = getattr(cls.Options, "RANGES", {})
    if field in ranges and got is not None:
        assert in_range(got, *ranges[field]), (name, field, got)
    if isinstance(got, float):
        assert math.isfinite(got), (name, field, got)


@pytest.mark.parametrize("method,options,msg", [
    ("rdb", {"vea_bottleneck": 0}, "RDB option vea_bottleneck must be >= 1"),
    ("rdb", {"weight_cls": float("nan")}, "weight_cls must be >= 0"),
    ("ftf", {"tau": 0}, "tau must be > 0"),
    ("ftf", {"alpha": 1.5}, "alpha must be >= 0 and <= 1"),
    ("iebaker", {"sar_k": 0}, "sar_k must be >= 1"),
    ("iebaker", {"eba_threshold": float("inf")}, "eba_threshold must be a finite number"),
    ("lora", {"alpha": -2}, "alpha must be > 0"),
])
def test_named_bad_options(method, options, msg):
    with pytest.raises(RsitrError, match=msg.replace("(", r"\(")):
        method_class(method).parse_options(options)


def test_the_cli_refuses_a_bad_option_in_one_line(tmp_path, capsys):
    from rsitr.cli import main

    rc = main(["train", "--data", str(tmp_path / "nowhere"), "--set", "method.name=rdb", "--set", "method.options.vea_bottleneck=0",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and ("vea_bottleneck" in err or "nowhere" in err)
