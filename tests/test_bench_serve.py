"""``rsitr bench serve`` drives a server it starts itself (small run: a few clients, a few seconds)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_bench_serve_small(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("faiss")
    import json

    from PIL import Image

    from rsitr.cli import main
    from rsitr.search import build as B

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (40 * i, 90, 30)).save(src / f"t{i}.png")
    B.build_index(src, "clip:tiny", tmp_path / "idx", B.BuildOptions(batch_size=8, progress=False))
    code = main(["-q", "bench", "serve", str(tmp_path / "idx"), "--clients", "3", "--duration", "3", "--warmup", "1", "-k", "3",
                 "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| text |" in out and "| image |" in out and "| thumb |" in out and "server RSS MB" in out
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["errors"] == 0 and got["answers_differing_from_sequence"] == 0 and got["answers_checked"] > 0
    assert all(r["requests"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in got["rows"])
    assert got["rss_mb"]["peak"] > 0
