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
    rows = S.run_search_bench([600, 1200], 32, 10, 10, tmp_path, kinds=("flat", "hnsw"), stores=["faiss"], flat_only_above=1000)
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


def test_stores_come_from_the_store_registry(tmp_path, monkeypatch):
    """The search part measures whatever registered store has a benchmark: a store of the test's
    own is measured and projected without rsitr.bench.scale knowing its name."""
    from rsitr.retrieval import stores as st

    @st.register_store
    class NumpyStore(st.FaissStore):
        kind = "numpy-test"
        bench_name = "numpy-test"
        bench_title = "NumPy Test"

        @classmethod
        def available(cls) -> bool:
            return True

    try:
        assert "numpy-test" in st.bench_store_kinds() and S.bench_stores() == list(st.bench_store_kinds())
        rows = S.run_search_bench([300, 600], 16, 5, 5, tmp_path, kinds=("flat",), stores=["faiss", "numpy-test"])
        assert [(r["n"], r["store"]) for r in rows] == [(300, "faiss"), (300, "numpy-test"), (600, "faiss"), (600, "numpy-test")]
        p = S.projection(None, rows, 16)
        assert "numpy_test_flat_fit" in p and "numpy_test_flat_with_metadata" in p["gb_per_million_tiles"]
        assert "numpy_test_flat_ms" in p["query_latency_ms"][0]
        md = S.render({"machine": {"cpus": 2, "load": 1.0}, "search": rows, "projection": p}, 5)
        assert "| FAISS flat ms | NumPy Test flat ms |" in md and "NumPy Test " in md
        assert not list(tmp_path.iterdir())  # every benchmark store removed its files
        with pytest.raises(RsitrError, match="unknown vector store"):
            S.bench_stores(["nosuch"])
        monkeypatch.setattr(NumpyStore, "available", classmethod(lambda cls: False))
        assert "numpy-test" not in S.bench_stores()
        with pytest.raises(RsitrError, match="not installed"):
            S.bench_stores(["numpy-test"])
    finally:
        st.unregister_store("numpy-test")


def test_old_results_keep_their_keys():
    """A saved run with a second store re-renders with the keys and columns it had (milvus-lite rows:
    milvus_lite_flat_fit, 'Milvus Lite flat ms')."""
    rows = [{"n": n, "dim": 8, "store": s, "kind": "flat", "params": "", "build_s": 1.0, "p50_ms": 1.0 + n / 1000, "p95_ms": 2.0,
             "recall@10": 1.0, "bytes_per_vector": 40.0} for n in (1000, 2000) for s in ("faiss", "milvus-lite")]
    p = S.projection(None, rows, 8)
    assert p["faiss_flat_fit"] == {"fixed_ms": 1.0, "ms_per_million": 1000.0} == p["milvus_lite_flat_fit"]
    assert list(p["gb_per_million_tiles"]) == ["vectors_float32", "faiss_flat", "faiss_hnsw", "milvus_lite_flat_with_metadata",
                                              "index_folder_embeddings_npy"]
    assert list(p["query_latency_ms"][0]) == ["tiles", "shards", "faiss_flat_ms", "milvus_lite_flat_ms", "ram_gb_per_shard"]
    md = S.render({"machine": {"cpus": 2, "load": 1.0}, "search": rows, "projection": p}, 10)
    assert "| tiles | shards | FAISS flat ms | Milvus Lite flat ms | RAM GB per shard |" in md


def test_cli_stores_flag(monkeypatch):
    """--stores picks the stores (checked before anything runs); the deprecated --no-KIND of an
    optional store still leaves it out."""
    from rsitr.cli import bench as cb
    from rsitr.retrieval.stores import bench_store_kinds

    p = argparse.ArgumentParser()
    cb.add_scale_args(p)
    assert p.parse_args([]).stores is None
    assert cb._scale_stores(p.parse_args(["--stores", "faiss, x"])) == ["faiss", "x"]
    optional = bench_store_kinds(available_only=False)[1:]
    if optional:
        args = p.parse_args([f"--no-{optional[0]}"])
        assert optional[0] not in cb._scale_stores(args) and "faiss" in cb._scale_stores(args)
    args = p.parse_args(["--stores", "nosuch", "--no-encode"])
    with pytest.raises(RsitrError, match="unknown vector store"):
        cb.cmd_scale(args)
