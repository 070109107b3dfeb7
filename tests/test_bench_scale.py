"""`rsitr bench scale`: the search part and the projection on a tiny size (the encode part is a Ray
build, tested in test_raybuild.py); re-rendering a saved run."""
from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("faiss")

from rsitr.bench import scale as S  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402


def test_search_part_projection_and_rerender(tmp_path, capsys):
    rows = S.run_search_bench([600, 1200], 32, 10, 10, tmp_path, kinds=("flat", "hnsw"), milvus=False, flat_only_above=1000)
    assert [(r["n"], r["kind"]) for r in rows] == [(600, "flat"), (600, "hnsw"), (1200, "flat")]
    assert all(r["recall@10"] == 1.0 for r in rows if r["kind"] == "flat")
    assert rows[0]["bytes_per_vector"] == pytest.approx(32 * 4, rel=0.05)
    p = S.projection({"rows": [{"tiles_per_s_per_core": 10.0}, {"tiles_per_s_per_core": 5.0}]}, rows, 32)
    assert "PROJECTION" in p["label"]
    assert p["encode"][0] == {"tiles": 10_000_000, "core_hours": round(1e7 / 10 / 3600, 1), "wall_h_64_cores": round(1e7 / 10 / 64 / 3600, 2),
                              "wall_h_512_cores": round(1e7 / 10 / 512 / 3600, 2)}
    # the latency projection from fixed measurements (measured ones depend on the machine's load)
    fixed = [{**r, "p50_ms": 1.0 + r["n"] / 1000} if r["kind"] == "flat" else r for r in rows]
    q = S.projection({"rows": [{"tiles_per_s_per_core": 10.0}]}, fixed, 32)
    assert q["faiss_flat_fit"] == {"fixed_ms": 1.0, "ms_per_million": 1000.0}
    lat = {(r["tiles"], r["shards"]): r["faiss_flat_ms"] for r in q["query_latency_ms"]}
    assert lat[(10_000_000, 1)] > lat[(10_000_000, 8)] > lat[(10_000_000, 64)]
    res = {"machine": {"cpus": 2, "load": 1.0, "python": "3"}, "search": rows, "projection": p}
    md = S.render(res, 10)
    assert "| 1,200 | faiss | flat |" in md and "PROJECTION" in md
    saved = tmp_path / "out.txt"
    saved.write_text(json.dumps(res) + "\n\n" + md)
    args = argparse.Namespace(from_json=str(saved), dim=256, json=False, limit=None, workers=[1], sizes=[100], k=10)
    from rsitr.cli.bench import cmd_scale

    assert cmd_scale(args) == 0
    out = capsys.readouterr().out
    assert "| 1,200 | faiss | flat |" in out
    (tmp_path / "bad.txt").write_text("no json here")
    with pytest.raises(RsitrError, match="not the JSON output"):
        S.load_result(tmp_path / "bad.txt")
