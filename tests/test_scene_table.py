"""scripts/scene_table.py end to end on a small synthetic GeoTIFF: both tilings built through the CLI,
one contact sheet and hits JSON per (query, tiling), the table skeleton printed, indexes reused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("faiss")

from rasterio.transform import from_origin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "scene_table.py"), *args],
                          capture_output=True, text=True, env=ENV, timeout=600)


def test_scene_table_builds_searches_and_reuses(tmp_path):
    scenes = tmp_path / "geo"
    scenes.mkdir()
    data = np.random.default_rng(0).integers(20, 230, (3, 300, 300)).astype(np.uint8)
    with rasterio.open(scenes / "s.tif", "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000.0, 5000000.0, 0.5, 0.5)) as ds:
        ds.write(data)
    tsv = tmp_path / "q.tsv"
    tsv.write_text("# scene\tquery\ns.tif\tstorage tanks\n\ns.tif\ta river\n", encoding="utf-8")
    out = tmp_path / "out"
    r = _run(str(tsv), str(out), "--scenes", str(scenes), "--checkpoint", "clip:tiny", "-k", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    for tiling in ("pixel", "metre"):
        assert (out / "s" / f"idx-{tiling}" / "manifest.json").is_file()
        for q in ("storage_tanks", "a_river"):
            assert (out / "s" / f"{tiling}__{q}.png").stat().st_size > 0
            hits = json.loads((out / "s" / f"{tiling}__{q}.json").read_text())
            assert len(hits["results"]) == 3 and all(h["wgs84"] for h in hits["results"])
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| s.tif |")]
    assert [ln.split(" | ")[1] for ln in rows] == ["storage tanks", "a river"]
    assert "- s.tif (pixel):" in r.stdout
    r2 = _run(str(tsv), str(out), "--scenes", str(scenes), "--checkpoint", "clip:tiny", "-k", "3")
    assert r2.returncode == 0 and r2.stderr.count("reusing") == 2 and "index build" not in r2.stderr


def test_scene_table_refuses_a_bad_line_and_a_missing_scene(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("s.tif storage tanks\n", encoding="utf-8")
    r = _run(str(bad), str(tmp_path / "o"), "--scenes", str(tmp_path))
    assert r.returncode != 0 and "bad.tsv:1: expected 'scene file<TAB>query'" in r.stderr
    missing = tmp_path / "m.tsv"
    missing.write_text("nope.tif\ta river\n", encoding="utf-8")
    r = _run(str(missing), str(tmp_path / "o"), "--scenes", str(tmp_path))
    assert r.returncode != 0 and "scene 'nope.tif' not found" in r.stderr
