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
