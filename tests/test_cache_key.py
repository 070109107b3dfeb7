"""The trunk-cache key names what the cached activations depend on (weights' digests, dataset
content, views, cut) and nothing else: not where the dataset or the weight files are."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import fake_trunks

from rsitr.data.captions import load_dataset
from rsitr.models.trunk_cache import _key, build_trunk_cache
from rsitr.data.transforms import EvalTransform


def _weights(folder: str, sha: str = "ab" * 32) -> dict:
    return {"image": f"/{folder}/site-packages/lite0.pth", "image_sha256": sha, "text": f"/{folder}/minilm/model.safetensors", "text_sha256": "cd" * 32}


@pytest.fixture(scope="module")
def synth(synth_dataset):
    return synth_dataset(n_images=12, seed=5, image_size=32)


def _copy(src, dst):
    shutil.copytree(src.parent if src.is_file() else src, dst)
    return dst / src.name if src.is_file() else dst


def test_key_ignores_dataset_and_weight_locations(synth, tmp_path):
    a = load_dataset(synth).split("train")
    b = load_dataset(_copy(synth, tmp_path / "elsewhere")).split("train")
    assert [e.path for e in a.entries] != [e.path for e in b.entries]
    for what in ("image", "text"):
        k1 = _key(fake_trunks(weights=_weights("venv1")), a, what, {"view": 0})
        k2 = _key(fake_trunks(weights=_weights("clone/.venv")), b, what, {"view": 0})
        assert k1 == k2
        # ... but the weights' digest, the extras and the split are in it
        assert _key(fake_trunks(weights=_weights("venv1", sha="ef" * 32)), a, what, {"view": 0}) != k1
        assert _key(fake_trunks(weights=_weights("venv1")), a, what, {"view": 1}) != k1
        assert _key(fake_trunks(weights=_weights("venv1")), load_dataset(synth).split("val"), what, {"view": 0}) != k1


def test_key_follows_image_content_and_captions(synth, tmp_path):
    copy = _copy(synth, tmp_path / "edited")
    ds = load_dataset(copy).split("train")
    bb = fake_trunks(weights=_weights("v"))
    img, txt = _key(bb, ds, "image", {}), _key(bb, ds, "text", {})
    # an image rewritten in place with the same size: new image key, same text key
    p = ds.entries[0].path
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid] ^= 0xFF
    p.write_bytes(bytes(data))
    ds2 = load_dataset(copy).split("train")
    assert _key(bb, ds2, "image", {}) != img and _key(bb, ds2, "text", {}) == txt
    # a caption changed: new text key
    ds2.entries[1].captions[0] += " and a road"
    assert _key(bb, ds2, "text", {}) != txt


def test_a_moved_dataset_and_new_venv_reuse_the_cache(synth, tmp_path):
    cache = tmp_path / "cache"
    ds = load_dataset(synth).split("train")
    first = fake_trunks(weights=_weights("venv1"))
    kw = dict(cache_dir=cache, eval_transform=EvalTransform(first.preprocess), batch_size=4, progress=False)
    c1 = build_trunk_cache(first, ds, **kw)
    assert first.calls > 0
    moved = load_dataset(_copy(synth, tmp_path / "moved")).split("train")
    second = fake_trunks(weights=_weights("other/.venv"))
    c2 = build_trunk_cache(second, moved, **kw)
    assert second.calls == 0  # everything loaded from the cache
    assert torch.equal(c1.image[0].pooled, c2.image[0].pooled) and torch.equal(c1.text.pooled, c2.text.pooled)
