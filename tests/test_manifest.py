"""The index manifest's owner type (rsitr.search.manifest.IndexManifest): an index written by the code
before it (tests/data/index_v1, commit 38a6f42) loads and searches identically and is migrated by
the next write; damaged fields are refused naming the file and the field; an edited embed_dim and a
missing item table are caught with one line each."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from rsitr.search.engine import SearchEngine  # noqa: E402
from rsitr.search.manifest import SCHEMA_VERSION, IndexManifest  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny():
    from rsitr.search.manifest import load_model

    return load_model("clip:tiny")


@pytest.fixture
def old(tmp_path):
    out = tmp_path / "index_v1"
    shutil.copytree(DATA / "index_v1", out)
    return out


def _raw(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _edit(d: Path, **kw) -> None:
    m = _raw(d)
    m.update(kw)
    (d / "manifest.json").write_text(json.dumps(m))


def test_an_index_written_before_the_owner_type_searches_identically(old, tiny):
    assert _raw(old)["version"] == 1 and "store" in _raw(old)
    m = IndexManifest.load(old)
    assert (m.count, m.embed_dim, m.index_kind, m.store_kind, m.generation, m.tile_size) == (4, 128, "flat", "faiss", 1, 32)
    assert m.model.checkpoint == "clip:tiny" and m.to_dict()["version"] == SCHEMA_VERSION
    want = json.loads((DATA / "index_v1.expected.json").read_text())
    eng = SearchEngine(old, model=tiny, engine="torch")
    try:
        for q in ("a river next to fields", "storage tanks"):
            got = [(r["id"], r["score"]) for r in eng.search(q, k=4)]
            assert [i for i, _ in got] == [i for i, _ in want[q]]
            np.testing.assert_allclose([s for _, s in got], [s for _, s in want[q]], atol=2e-6)
        assert [r["id"] for r in eng.search("storage tanks", k=4, bbox="-180,-90,180,90")] == want["bbox"]
    finally:
        eng.close()


def test_a_manifest_older_than_stores_is_migrated_and_rewritten(old, tiny, tmp_path):
    from rsitr.bench.search import write_sample_source
    from rsitr.search import build as B

    raw = _raw(old)
    for key in ("store", "sources"):
        raw.pop(key)
    raw.pop("version")  # the first manifests: no version, no store
    (old / "manifest.json").write_text(json.dumps(raw))
    m = IndexManifest.load(old)
    assert m.store == {"kind": "faiss"} and m.sources == []
    src = write_sample_source(tmp_path / "more", n_png=2, geotiff=False, tile=32, seed=5)
    r = B.add_to_index(old, src, B.BuildOptions(batch_size=4, progress=False, engine="torch"), model=tiny)
    assert r.total == 6 and r.added == 2
    new = _raw(old)
    assert new["version"] == SCHEMA_VERSION and new["store"] == {"kind": "faiss"} and new["generation"] == 2
    assert IndexManifest.from_dict(new).to_dict() == new  # a save round-trips


@pytest.mark.parametrize("edit, field", [
    ({"embed_dim": "128"}, "'embed_dim'"), ({"count": -1}, "'count'"), ({"tokens": 1}, "'tokens'"),
    ({"tiling": {"tile_size": 32, "overlap": 32}}, "'tiling.overlap'"), ({"index": {"kind": "lsh"}}, "'index.kind'"),
    ({"files": {"items": "../etc/passwd", "embeddings": "e.npy"}}, "'files.items'"), ({"sources": "x"}, "'sources'"),
    ({"store": {"kind": "elastic"}}, "'store.kind'"), ({"model": {"checkpoint": "clip:tiny"}}, "'model.state_sha256'"),
])
def test_damaged_fields_are_named(old, edit, field):
    _edit(old, **edit)
    with pytest.raises(RsitrError, match=f"manifest.json: damaged index manifest: {field}") as e:
        IndexManifest.load(old)
    assert "\n" not in str(e.value)


def test_versions(old):
    _edit(old, version=SCHEMA_VERSION + 1)
    with pytest.raises(RsitrError, match="newer rsitr"):
        IndexManifest.load(old)
    _edit(old, format="something-else")
    with pytest.raises(RsitrError, match="not an rsitr index manifest"):
        IndexManifest.load(old)


def test_an_edited_embed_dim_is_refused(old, tiny):
    _edit(old, embed_dim=64)
    with pytest.raises(RsitrError, match=r"'embed_dim' is 64 but embeddings.000001.npy holds vectors of shape \(4, 128\)") as e:
        SearchEngine(old, load_model=False)
    assert "\n" not in str(e.value)


def test_a_missing_item_table_is_named(old):
    (old / "items.000001.jsonl").unlink()
    with pytest.raises(RsitrError, match="items.jsonl is missing") as e:
        SearchEngine(old, load_model=False)
    assert "changed under" not in str(e.value) and "\n" not in str(e.value)
