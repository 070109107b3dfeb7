"""``rsitr bench serve`` drives a server it starts itself (small run: a few clients, a few seconds)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _small_index(tmp_path, n: int) -> None:
    """``tmp_path/idx``: ``n`` plain 40 px tiles indexed with clip:tiny."""
    pytest.importorskip("fastapi")
    pytest.importorskip("faiss")
    from PIL import Image

    from rsitr.search import build as B

    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90, 30)).save(src / f"t{i}.png")
    B.build_index(src, "clip:tiny", tmp_path / "idx", B.BuildOptions(batch_size=8, progress=False))


def test_bench_serve_small(tmp_path, capsys):
    import json

    from rsitr.cli import main

    _small_index(tmp_path, 5)
    code = main(["-q", "bench", "serve", str(tmp_path / "idx"), "--clients", "3", "--duration", "3", "--warmup", "1", "-k", "3",
                 "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| text |" in out and "| image |" in out and "| thumb |" in out and "server RSS MB" in out
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["errors"] == 0 and got["answers_differing_from_sequence"] == 0 and got["answers_checked"] > 0
    assert all(r["requests"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in got["rows"])
    assert got["rss_mb"]["peak"] > 0


def test_bench_serve_upload_mix(tmp_path, capsys):
    """``--mix text:0.5,upload:0.5`` sends a large file; RSS is read after warm-up, at the end and
    after an idle pause."""
    import json

    from rsitr.bench.serve_load import make_upload_tiff
    from rsitr.cli import main

    _small_index(tmp_path, 3)
    up = make_upload_tiff(tmp_path / "up.tif", megabytes=1.0)
    assert 0.9 < up.stat().st_size / 2**20 < 1.1
    code = main(["-q", "bench", "serve", str(tmp_path / "idx"), "--clients", "2", "--duration", "2", "--warmup", "1", "-k", "2",
                 "--mix", "text:0.5,upload:0.5", "--upload", str(up), "--idle", "1", "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert code == 0 and "| upload |" in out and "| thumb |" not in out and "idle" in out
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["errors"] == 0 and got["answers_differing_from_sequence"] == 0
    assert [r["kind"] for r in got["rows"]] == ["text", "upload"] and all(r["requests"] > 0 for r in got["rows"])
    a = got["rss_after_load_mb"]
    assert a["after_warmup"] > 0 and a["at_end"] > 0 and a["after_idle"] > 0 and isinstance(a["returned_within_10pct"], bool)


def test_parse_mix():
    from rsitr.bench.serve_load import parse_mix
    from rsitr.utils.errors import RsitrError

    assert parse_mix("text:0.5,upload:0.5") == {"text": 0.5, "image": 0.0, "thumb": 0.0, "upload": 0.5}
    assert parse_mix("0.7,0.1,0.2") == {"text": 0.7, "image": 0.1, "thumb": 0.2, "upload": 0.0}
    assert parse_mix(None)["text"] == 0.7
    for bad in ("text:-1", "bogus:1", "1,2", "text:x", "text:0"):
        with pytest.raises(RsitrError, match="--mix"):
            parse_mix(bad)


def test_bench_serve_is_quiet_by_default(tmp_path, caplog):
    """No log line per request (the HTTP client's INFO lines, the server's access log) unless -v."""
    import logging

    from rsitr.bench.serve_load import run_serve_bench

    _small_index(tmp_path, 3)
    caplog.set_level(logging.INFO)
    got = run_serve_bench(tmp_path / "idx", clients=2, duration=2, warmup=0.5, k=3, idle=0.5)
    assert got["total_requests"] > 0
    per_request = [r for r in caplog.records if r.name.startswith(("httpx", "httpcore")) or "HTTP Request" in r.getMessage()]
    assert per_request == []
