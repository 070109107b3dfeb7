"""Issue 27 item 2: ``rsitr search``, ``rsitr serve`` (at start, in /healthz and the page header) and
``rsitr eval`` say so in one WARNING line when the index or model they use comes from a spec with
untrained heads (``rsitr index build`` already did), naming the spec and the shipped model."""
from __future__ import annotations

import logging

import pytest

pytest.importorskip("faiss")

from rsitr.cli import main  # noqa: E402

SPEC = "clip:tiny"


@pytest.fixture(scope="module")
def untrained_index(tmp_path_factory):
    from rsitr.bench.search import write_sample_source
    from rsitr.search import build as B

    src = write_sample_source(tmp_path_factory.mktemp("src"), n_png=2, geotiff=False, tile=64)
    out = tmp_path_factory.mktemp("idx") / "index"
    B.build_index(src, SPEC, out, B.BuildOptions(tile_size=64, batch_size=8, progress=False))
    return out


def _the_warning(caplog) -> str:
    """The one WARNING record about untrained heads (exactly one, on one line)."""
    found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "untrained" in r.getMessage()]
    assert len(found) == 1, found
    msg = found[0]
    assert SPEC in msg and "shipped model" in msg and ("without --checkpoint" in msg or "omit --checkpoint" in msg)
    assert "\n" not in msg
    return msg


def test_search_warns(untrained_index, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "search", str(untrained_index), "a green field", "-k", "2"]) == 0
    msg = _the_warning(caplog)
    assert str(untrained_index) in msg and "rsitr index build" in msg


def test_serve_warns_at_start_in_healthz_and_in_the_page(untrained_index, caplog):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rsitr.serve.app import create_app

    with caplog.at_level(logging.WARNING):
        app = create_app(untrained_index)
    msg = _the_warning(caplog)
    client = TestClient(app)
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model_warning"] and h["model_warning"] in msg
    assert str(untrained_index) not in h["model_warning"]  # /healthz needs no token: no server paths in it
    page = client.get("/").text
    assert 'id="model-warning"' in page and "INFO.model_warning" in page


def test_eval_warns(synth_dataset, caplog, capsys):
    ann = synth_dataset(n_images=20, seed=3, image_size=64)
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "eval", "--data", str(ann), "--checkpoint", SPEC, "--json", "--batch-size", "16"]) == 0
    assert "omit --checkpoint" in _the_warning(caplog)


def test_trained_models_are_not_warned_about(untrained_index):
    import dataclasses

    from rsitr.models.registry import untrained_warning
    from rsitr.search.manifest import IndexManifest

    assert untrained_warning(SPEC) and untrained_warning("towers:efficientnet-lite0+minilm-l6")
    assert untrained_warning("runs/x") is None and untrained_warning("shipped:rsitr-x") is None and untrained_warning(None) is None
    m = IndexManifest.load(untrained_index)
    assert SPEC in m.untrained_warning()
    trained = dataclasses.replace(m, model=dataclasses.replace(m.model, checkpoint="/runs/rs1/best.pt"))
    assert trained.untrained_warning() is None
