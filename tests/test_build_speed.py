"""Index build at CPU speed (issue 31): the threaded decode pipeline gives the sequential path's
vectors, test-time views in the index, ``--index-kind auto`` and recall in ``bench search``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    from rsitr.search.build import load_model

    return load_model("clip:tiny")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """PNG tiles of several sizes and modes (RGB, L, RGBA; smaller and larger than the model's
    64 px input) and a 4-band uint16 GeoTIFF cut into tiles."""
    pytest.importorskip("rasterio")
    from PIL import Image

    from rsitr.bench.search import write_sample_source

    src = write_sample_source(tmp_path_factory.mktemp("src"), n_png=5, grid=(2, 3), tile=64)
    rng = np.random.default_rng(0)
    for i, (size, mode) in enumerate([((50, 40), "RGB"), ((90, 70), "L"), ((64, 64), "RGBA")]):
        arr = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
        (img.convert("L") if mode == "L" else img).save(src / "png" / f"odd_{i}.png")
    return src


def _sequential(model, index_dir: Path, tta: int) -> np.ndarray:
    """The old path: each item through EvalTransform on its own, stacked, each view encoded by its
    own call, the L2-normalised view embeddings averaged and normalised again."""
    from rsitr.data.transforms import EvalTransform, dihedral_views
    from rsitr.search.build import read_items, read_manifest
    from rsitr.search.sources import read_item

    items = read_items(index_dir, read_manifest(index_dir))
    tf = EvalTransform(model.backbone.preprocess)
    px = torch.stack([tf(read_item(it)) for it in items])
    with torch.no_grad():
        views = [torch.nn.functional.normalize(model.backbone.encode_image(v).float(), dim=-1) for v in dihedral_views(px, tta)]
    return torch.nn.functional.normalize(torch.stack(views).mean(0), dim=-1).numpy()


@pytest.mark.parametrize("tta", [1, 8])
def test_pipeline_vectors_equal_the_sequential_path(model, source, tmp_path, tta):
    from rsitr.search import build as B

    out = tmp_path / "idx"
    r = B.build_index(source, "clip:tiny", out, B.BuildOptions(tile_size=64, batch_size=4, workers=3, tta=tta, engine="torch",
                                                               progress=False), model=model)
    m = B.read_manifest(out)
    assert r.encoded == m.count == 14 and m.test_time_views == tta
    got = B.read_embeddings(out, m)
    np.testing.assert_allclose(got, _sequential(model, out, tta), atol=1e-5, rtol=0)
    assert set(r.profile) == {"decode", "resize", "wait", "encode", "write"}
    assert r.profile["encode"]["seconds"] > 0 and abs(sum(d["share"] for d in r.profile.values()) - 1) < 0.01


def test_index_add_keeps_the_manifests_views(model, source, tmp_path):
    from rsitr.search import build as B

    out = tmp_path / "idx"
    B.build_index(source / "png", "clip:tiny", out, B.BuildOptions(tile_size=64, batch_size=4, tta=4, engine="torch", progress=False),
                  model=model)
    B.add_to_index(out, source, B.BuildOptions(batch_size=4, engine="torch", progress=False), model=model)  # opts say tta 1
    m = B.read_manifest(out)
    assert m.test_time_views == 4 and m.count == 14
    np.testing.assert_allclose(B.read_embeddings(out, m), _sequential(model, out, 4), atol=1e-5, rtol=0)


def test_tta8_vectors_are_invariant_to_rotating_the_sources(model, tmp_path):
    """Tiles at the model's input size (no resampling): every dihedral symmetry of a source image
    gives the same tta-8 vector."""
    from PIL import Image

    from rsitr.search import build as B

    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    ops = {"same": lambda a: a, "rot90": lambda a: np.rot90(a, 1), "rot270-flip": lambda a: np.fliplr(np.rot90(a, 3)),
           "transpose": lambda a: np.transpose(a, (1, 0, 2))}
    embs = {}
    for name, op in ops.items():
        d = tmp_path / name
        d.mkdir()
        for i, t in enumerate(tiles):
            Image.fromarray(np.ascontiguousarray(op(t))).save(d / f"t{i}.png")
        out = tmp_path / f"idx-{name}"
        B.build_index(d, "clip:tiny", out, B.BuildOptions(batch_size=2, tta=8, progress=False), model=model)
        embs[name] = B.read_embeddings(out, B.read_manifest(out))
    for name in ops:
        np.testing.assert_allclose(embs[name], embs["same"], atol=1e-5, rtol=0)
    # one view is not invariant: the check above has something to find
    B.build_index(tmp_path / "rot90", "clip:tiny", tmp_path / "one", B.BuildOptions(tta=1, progress=False), model=model)
    B.build_index(tmp_path / "same", "clip:tiny", tmp_path / "one0", B.BuildOptions(tta=1, progress=False), model=model)
    a, b = (B.read_embeddings(tmp_path / n, B.read_manifest(tmp_path / n)) for n in ("one", "one0"))
    assert np.abs(a - b).max() > 1e-3


# -- index kind auto ---------------------------------------------------------------------------------
def _clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _timed(monkeypatch, ms: dict[str, float]) -> None:
    """Make auto_index's query timing deterministic: ``ms[kind]`` for every candidate of that kind."""
    from rsitr.retrieval import autoindex

    monkeypatch.setattr(autoindex, "query_ms", lambda vi, xq, k: (ms[vi.kind], ms[vi.kind] * 1.5))


def test_auto_index_keeps_the_fastest_candidate_that_reaches_the_target(monkeypatch):
    from rsitr.retrieval.autoindex import auto_index, exact_neighbours, jittered_queries, recall_at_k

    x = _clustered(4000)
    vi, rec = auto_index(x[:500], 0.95, flat_below=1000)
    assert vi.kind == "flat" and rec["kind"] == "flat" and rec["recall@10"] == 1.0 and rec["candidates"] == []
    _timed(monkeypatch, {"ivf": 2.0, "hnsw": 1.0})
    vi, rec = auto_index(x, 0.95, flat_below=1000, n_queries=200, progress=False)
    assert vi.kind == rec["kind"] == "hnsw" and rec["params"]["efSearch"] == vi.ef_search == vi.faiss_index.hnsw.efSearch
    assert rec["params"]["M"] == vi.hnsw_m == 32 and rec["recall@10"] >= 0.95 and rec["queries"] == 200
    assert rec["query_ms"] == {"p50": 1.0, "p95": 1.5}
    # what it tried: IVF (reached, slower), HNSW M 32 (kept), HNSW M 48 not built since M 32 reached the target
    ivf, h32, h48 = rec["candidates"]
    assert ivf["kind"] == "ivf" and ivf["reached"] and ivf["recall@10"] >= 0.95 and ivf["query_ms"]["p50"] == 2.0
    assert set(ivf["params"]) == {"nlist", "nprobe"} and h32["params"] == rec["params"] and h32["reached"]
    assert h48["params"]["M"] == 48 and "skipped" in h48 and "reached" not in h48
    # the other way round the IVF is kept, with its tuned nprobe in the index
    _timed(monkeypatch, {"ivf": 0.5, "hnsw": 1.0})
    vi, rec = auto_index(x, 0.95, flat_below=1000, n_queries=200, progress=False)
    assert vi.kind == rec["kind"] == "ivf" and rec["params"] == {"nlist": vi.nlist, "nprobe": vi.nprobe}
    assert vi.faiss_index.nprobe == vi.nprobe and rec["params"] == rec["candidates"][0]["params"]
    # the recorded recall is what the index does on other queries of the same kind
    q = jittered_queries(x, 200, seed=7)
    assert recall_at_k(vi.search(q, 10)[1], exact_neighbours(x, q, 10), 10) >= 0.93


@pytest.mark.parametrize("seed", range(6))
def test_auto_index_reaches_the_target_on_queries_it_was_not_tuned_on(seed):
    """The knob is raised until the lower 95 % bound of the tuning queries' recall reaches the
    target, not their mean: on 1,000 fresh queries of the same kind the index still reaches it
    (generated archives; with the mean alone a small graph landed at 0.899 for a 0.9 target)."""
    from rsitr.retrieval.autoindex import auto_index, exact_neighbours, jittered_queries, recall_at_k

    x = _clustered(6000, seed=seed)
    vi, rec = auto_index(x, 0.9, flat_below=1000, n_queries=150, seed=seed, candidates=(("hnsw", {"M": 8, "efConstruction": 16}),),
                         progress=False)
    assert vi.kind == "hnsw" and 0.9 <= rec["recall_lower95"] <= rec["recall@10"]
    q = jittered_queries(x, 1000, seed=1000 + seed)
    assert recall_at_k(vi.search(q, 10)[1], exact_neighbours(x, q, 10), 10) >= 0.9


def test_auto_index_falls_back_to_exact_search_only_when_no_candidate_reaches_the_target():
    from rsitr.retrieval.autoindex import auto_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # no cluster structure: an IVF probing at most an eighth of its cells cannot find every exact neighbour
    vi, rec = auto_index(x, 1.0, flat_below=1000, n_queries=100, candidates=(("ivf", {}),), progress=False)
    assert vi.kind == rec["kind"] == "flat" and len(vi) == 3000 and rec["recall@10"] == 1.0
    (ivf,) = rec["candidates"]
    assert ivf["kind"] == "ivf" and not ivf["reached"] and ivf["recall@10"] < 1.0 and ivf["params"]["nprobe"] == ivf["params"]["nlist"] // 8
    assert "no candidate reached" in rec["why"]
    # a spent build budget starts no candidate (each says why) and falls back the same way
    vi, rec = auto_index(x, 0.5, flat_below=1000, n_queries=100, budget_s=0.0, progress=False)
    assert vi.kind == "flat" and [c["kind"] for c in rec["candidates"]] == ["ivf", "hnsw", "hnsw"]
    assert all("build budget" in c["skipped"] for c in rec["candidates"])


def test_auto_index_abandons_a_candidate_whose_build_would_end_past_the_budget(monkeypatch):
    import types

    from rsitr.retrieval import autoindex

    clock = iter(range(5, 10**6, 5))  # every reading of the clock is 5 s later: the build rate projects far past 12 s
    monkeypatch.setattr(autoindex, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(autoindex, "ADD_CHUNK", 500)
    x = _clustered(3000)
    vi, rec = autoindex.auto_index(x, 0.5, flat_below=1000, n_queries=50, budget_s=12.0, progress=False,
                                   candidates=(("hnsw", {"M": 8, "efConstruction": 16}),))
    (h,) = rec["candidates"]
    assert vi.kind == rec["kind"] == "flat" and h["skipped"].startswith("abandoned after") and "past the build budget 12 s" in h["skipped"]


def test_build_with_index_kind_auto_records_kind_params_and_recall(model, source, tmp_path, monkeypatch):
    from rsitr.retrieval.index import VectorIndex
    from rsitr.search import build as B
    from rsitr.search.engine import SearchEngine
    from rsitr.search.manifest import IndexManifest

    out = tmp_path / "idx"
    _timed(monkeypatch, {"ivf": 0.5, "hnsw": 1.0})
    B.build_index(source, "clip:tiny", out, B.BuildOptions(tile_size=64, index_kind="auto", auto_flat_below=5, progress=False), model=model)
    m = B.read_manifest(out)
    full = json.loads((out / "manifest.json").read_text())
    raw = full["index"]
    auto = raw["auto"]
    assert raw["kind"] == m.index_kind == "ivf" and m.kind_option == "auto" and auto["target_recall"] == 0.95
    assert auto["recall@10"] >= 0.95 and auto["queries"] == 14 and set(auto["params"]) == {"nlist", "nprobe"}
    assert raw["nlist"] == m.nlist == auto["params"]["nlist"] and auto["query_ms"]["p50"] == 0.5
    assert [c["kind"] for c in auto["candidates"]] == ["ivf", "hnsw", "hnsw"] and auto["candidates"][1]["reached"]
    # the record round-trips through the manifest's one reader and writer
    assert IndexManifest.from_dict(full).to_dict() == full
    vi = VectorIndex.load(out / m.files["vectors"])
    assert vi.kind == "ivf" and vi.nlist == auto["params"]["nlist"] and vi.nprobe == auto["params"]["nprobe"]
    assert SearchEngine(out, model=model).search("a harbour", k=3)
    # index add keeps choosing: the manifest's auto flag and target are used
    import shutil

    more = tmp_path / "more"
    more.mkdir()
    for p in sorted((source / "png").glob("*.png"))[:3]:
        shutil.copy(p, more / f"copy_{p.name}")
    _timed(monkeypatch, {"ivf": 2.0, "hnsw": 1.0})
    B.add_to_index(out, more, B.BuildOptions(progress=False), model=model)
    m = B.read_manifest(out)
    assert m.kind_option == "auto" and m.index_kind == "hnsw" and m.nlist is None and m.count == 17
    assert VectorIndex.load(out / m.files["vectors"]).ef_search == m.index_auto["params"]["efSearch"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rsitr.cli", "--threads", "1", "-q", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_auto_refuses_an_impossible_target_in_one_line(source, tmp_path):
    p = _cli("index", "build", str(source), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "idx"), "--index-kind", "auto",
             "--target-recall", "1.5", cwd=tmp_path)
    assert p.returncode != 0
    # one line says it (besides the warning that clip:tiny has untrained heads), no traceback
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip() and "untrained" not in ln]
    assert len(lines) == 1 and "--target-recall must be in (0, 1]" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "idx").exists()


@pytest.mark.slow
def test_cli_build_tta_and_profile(source, tmp_path):
    p = _cli("index", "build", str(source), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "idx"), "--tile-size", "64",
             "--tta", "4", "--workers", "2", "--profile", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "time: decode" in p.stdout and "encode" in p.stdout and "write" in p.stdout
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["test_time_views"] == 4


# -- bench search --------------------------------------------------------------------------------------
def test_bench_search_reports_recall_without_flat():
    from rsitr.bench.search import run_search_bench

    rows = run_search_bench(sizes=(3000,), dim=32, kinds=("ivf", "hnsw"), n_queries=30, data="clustered", progress=False)
    assert [r["kind"] for r in rows] == ["ivf", "hnsw"]
    for r in rows:
        assert 0.0 <= r["recall@10"] <= 1.0, r  # measured (it was nan unless flat was timed too)
    assert rows[1]["recall@10"] > 0.5
    auto = run_search_bench(sizes=(3000,), dim=32, kinds=("auto",), n_queries=30, data="clustered", progress=False)[0]
    assert auto["params"].startswith("flat") and auto["recall@10"] == 1.0  # 3000 < 50k vectors: exact


def test_decode_workers_normalise_bit_identically_to_eval_transform(model, source, monkeypatch):
    """The decode threads write normalised float32 rows (not uint8 for the encoder's thread to
    normalise); the batch equals EvalTransform's per-image pixels exactly, in the items' order."""
    import threading

    from rsitr.data.transforms import EvalTransform
    from rsitr.search.pipeline import BatchDecoder, StageTimes
    from rsitr.search.sources import Tiling, read_item, scan_source_report

    items = scan_source_report(source, Tiling(64, 0, max_nodata=None)).items
    tf = EvalTransform(model.backbone.preprocess)
    threads = set()
    real = BatchDecoder.normalize_into

    def spy(self, rgb, out):
        threads.add(threading.current_thread().name)
        return real(self, rgb, out)

    monkeypatch.setattr(BatchDecoder, "normalize_into", spy)
    decoder = BatchDecoder(tf, 3, StageTimes())
    try:
        got_items, px = decoder.result(decoder.submit(items))
    finally:
        decoder.close()
    assert [it.key for it in got_items] == [it.key for it in items]
    assert px.dtype == torch.float32 and px.is_contiguous()
    assert torch.equal(px, torch.stack([tf(read_item(it)) for it in items]))
    assert threads and all(t.startswith("rsitr-decode") for t in threads)
