"""Bad files given to the command line end in one line on stderr and exit status 2: no traceback,
no advice to unpickle an untrusted file (issue 21)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from rsitr.cli import main


def _run(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _bad_checkpoints(root: Path) -> dict[str, Path]:
    """A corpus of files that are not checkpoints, each named by what is wrong with it."""
    rng = torch.Generator().manual_seed(0)
    rand = bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist())
    files: dict[str, bytes] = {
        "random.safetensors": rand,
        "random.pt": rand,
        "empty.pt": b"",
        "empty.safetensors": b"",
        "zip-garbage.pt": b"PK\x03\x04" + rand[:200],
        "text.bin": b"this is not a checkpoint\n" * 10,
        # a safetensors header length claiming more than the file holds
        "bad-header.safetensors": (1000).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    }
    out = {}
    for name, data in files.items():
        p = root / name
        p.write_bytes(data)
        out[name] = p
    # a real checkpoint cut in half (the zip's central directory is gone)
    full = root / "full.pt"
    torch.save({"w": torch.zeros(1000)}, full)
    half = root / "truncated.pt"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out["truncated.pt"] = half
    # a pickle that holds an object (what weights_only refuses)
    evil = root / "object.pt"
    torch.save({"w": torch.zeros(2), "obj": zipfile.ZipInfo("x")}, evil)
    out["object.pt"] = evil
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    for i in range(2):
        Image.new("RGB", (32, 32), (10 * i, 80, 40)).save(d / f"t{i}.png")
    return d


def test_bad_checkpoints_one_line_exit_2(tmp_path, capsys, images):
    for name, path in _bad_checkpoints(tmp_path).items():
        code, err = _run(capsys, ["-q", "index", "build", str(images), "--checkpoint", str(path), "--out", str(tmp_path / f"idx-{name}")])
        assert code == 2, (name, code, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("rsitr: error: ") and str(path) in lines[0], (name, err)
        assert "Traceback" not in err
        assert "weights_only" not in err and "Re-running" not in err and "arbitrary code" not in err, (name, err)
        assert "safe_globals" not in err and "Please use" not in err, (name, err)


def test_bad_rsitr_checkpoint_file(tmp_path):
    """The training-checkpoint reader words a corrupt file the same way (one line, no advice)."""
    from rsitr.models.checkpoint import TrainCheckpoint
    from rsitr.utils.errors import CheckpointError

    for name, path in _bad_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            TrainCheckpoint.load(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and "weights_only" not in msg, (name, msg)


def test_corrupt_trunk_cache_is_named(tmp_path):
    from rsitr.data.imagesets import _load_or_compute
    from rsitr.utils.errors import RsitrError

    p = tmp_path / "img-abc.pt"
    p.write_bytes(os.urandom(100))
    with pytest.raises(RsitrError, match="trunk-feature cache"):
        _load_or_compute(p, None)


def test_config_values_are_type_checked():
    """``--set time_budget=abc`` used to end in a TypeError deep inside the run."""
    from rsitr.train.config import TrainConfig
    from rsitr.utils.errors import RsitrError

    with pytest.raises(RsitrError, match=r"time_budget: expected float or null, got 'abc'"):
        TrainConfig().override({"time_budget": "abc"})
    with pytest.raises(RsitrError, match="epochs: expected int"):
        TrainConfig().override({"epochs": 2.5})
    with pytest.raises(RsitrError, match="model.backbone: expected str"):
        TrainConfig().override({"model.backbone": 3})
    cfg = TrainConfig().override({"epochs": 2.0, "lr": 1, "time_budget": None})
    assert cfg.epochs == 2 and isinstance(cfg.epochs, int) and cfg.lr == 1.0 and isinstance(cfg.lr, float)
