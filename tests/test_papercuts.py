"""Issue 21's papercuts that a test can check: file modes, quiet library loaders, one GDAL error,
progress lines off a terminal, the license metadata."""
from __future__ import annotations

import logging
import os
import stat
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_writes_respect_the_umask(tmp_path):
    from rsitr.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o027)
        atomic_write_text(tmp_path / "b.json", "{}")
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("writer", ["safetensors", "replace-0600"])
def test_atomic_writes_keep_the_mode_when_the_writer_replaces_the_file(tmp_path, writer):
    """A writer that creates its file anew (safetensors' save_file gives 0600) still leaves a file
    of the umask's mode: an exported model is readable by the other users of a shared folder."""
    from rsitr.utils.io import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.bin") as tmp:
            if writer == "safetensors":
                import torch
                from safetensors.torch import save_file

                save_file({"a": torch.zeros(2)}, str(tmp))
            else:
                tmp.unlink()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, b"x")
                os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.bin").stat().st_mode) == 0o644


def test_index_files_are_readable_by_others(tmp_path):
    pytest.importorskip("faiss")
    from PIL import Image

    from rsitr.search import build as B

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 30)).save(src / f"t{i}.png")
    old = os.umask(0o022)
    try:
        B.build_index(src, "clip:tiny", tmp_path / "idx", B.BuildOptions(batch_size=8, progress=False))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "idx").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, (p, oct(p.stat().st_mode))


def test_faiss_loader_is_quiet(caplog):
    pytest.importorskip("faiss")
    from rsitr.retrieval.index import load_faiss

    load_faiss()
    assert logging.getLogger("faiss.loader").getEffectiveLevel() >= logging.WARNING
    with caplog.at_level(logging.INFO):
        logging.getLogger("faiss.loader").info("Could not load library with AVX2 support due to: ...")
    assert "AVX2" not in caplog.text


def test_corrupt_tile_error_reported_once(tmp_path, capsys, caplog):
    pytest.importorskip("rasterio")
    from rsitr.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.tif").write_bytes(os.urandom(2000))
    with caplog.at_level(logging.INFO):
        code = main(["index", "build", str(src), "--checkpoint", "clip:tiny", "--out", str(tmp_path / "idx")])
    err = capsys.readouterr().err + caplog.text
    assert code == 2
    assert err.count("not recognized as being in a supported file format") == 1, err


def test_progress_logs_lines_off_a_terminal(caplog):
    from rsitr.utils.progress import LogProgress, progress_bar

    with caplog.at_level(logging.INFO, logger="rsitr.progress"):
        bar = progress_bar(range(250), total=250, desc="encode")  # pytest's stderr is not a terminal
        assert isinstance(bar, LogProgress)
        assert sum(1 for _ in bar) == 250
    lines = [r.getMessage() for r in caplog.records if r.name == "rsitr.progress"]
    assert len(lines) == 10 and lines[-1].startswith("encode: 250/250") and "(100%)" in lines[-1], lines
    assert all("\r" not in ln for ln in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rsitr.progress"):
        bar = progress_bar(total=7, initial=3, desc="epoch 1/2", log_steps=2)
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.5")
        bar.close()
        list(progress_bar(range(5), desc="quiet", disable=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "rsitr.progress"]
    assert len(lines) == 2 and lines[-1].startswith("epoch 1/2: 7/7"), lines


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
