"""scripts/top_cost.py: per-step cost of the two-tower's trained tops, timed per mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "top_cost.py"), *args], capture_output=True, text=True, env=env, timeout=600)


def test_top_cost_times_each_mode_and_deeper_tops_cost_more():
    r = run("--modes", "top:1,1", "top:1,6", "--batch", "4", "--rounds", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert list(res) == ["top:1,1", "top:1,6"]
    assert all(v["step"] == round(v["image"] + v["text"], 4) and v["image"] > 0 and v["text"] > 0 for v in res.values())
    # what is timed: the image top is the same in both modes, the text top six MiniLM layers against one
    # (parameter counts, not seconds: the test asserts what runs, not how fast)
    one, six = res["top:1,1"], res["top:1,6"]
    assert one["image_trained"] == six["image_trained"] > 0
    extra = six["text_trained"] - one["text_trained"]  # five more MiniLM layers, all alike
    assert extra > 0 and extra % 5 == 0 and one["text_trained"] > extra // 5


def test_top_cost_refuses_bad_options_in_one_line():
    r = run("--batch", "0")
    assert r.returncode == 2 and "must be >= 1" in r.stderr and "Traceback" not in r.stderr
    r = run("--modes", "top:9,1", "--batch", "2", "--rounds", "1")
    assert r.returncode == 2 and r.stderr.startswith("top_cost:") and "Traceback" not in r.stderr
