"""Image loading (every pixel format) and the torchvision-free transforms.

EvalTransform is checked against a direct PIL + numpy computation of torchvision's rules
(short side -> S with the long side truncated, bicubic, center crop with round-half-even
offsets, /255, (x - mean) / std) and against hand-computed sizes and offsets.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from rsitr.data.images import image_size, load_image, to_uint8
from rsitr.data.transforms import (
    EvalTransform,
    TrainTransform,
    batch_collate,
    center_crop,
    random_resized_crop_params,
    shortest_side_size,
)
from rsitr.models.base import PreprocessConfig
from rsitr.utils.errors import DataError

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def textured(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def reference_eval(img: Image.Image, s: int) -> np.ndarray:
    """torchvision Resize(s, bicubic) + CenterCrop(s) + ToTensor + Normalize, written out."""
    w, h = img.size
    if w <= h:
        nw, nh = s, int(s * h / w)
    else:
        nw, nh = int(s * w / h), s
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    a = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.float32) / np.float32(255)
    return ((a - MEAN) / STD).transpose(2, 0, 1)


# -- EvalTransform ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (256, 256), (247, 247), (100, 60), (205, 200), (224, 229)])
def test_eval_transform_matches_reference(size):
    s = 224
    img = textured(*size, seed=sum(size))
    out = EvalTransform(PreprocessConfig(image_size=s))(img)
    assert out.shape == (3, s, s) and out.dtype == torch.float32
    ref = reference_eval(img, s)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)


def test_long_side_is_truncated_not_rounded():
    # 224 * 205 / 200 = 229.6 -> 229 (torchvision truncates), 224 * 300 / 200 = 336
    assert shortest_side_size(205, 200, 224) == (229, 224)
    assert shortest_side_size(200, 205, 224) == (224, 229)
    assert shortest_side_size(300, 200, 224) == (336, 224)
    assert shortest_side_size(247, 247, 224) == (224, 224)
    assert shortest_side_size(100, 60, 224) == (373, 224)  # upsampling: 224 * 100 / 60 = 373.3


@pytest.mark.parametrize("extra,expected_top", [(1, 0), (2, 1), (3, 2), (5, 2), (7, 4)])
def test_center_crop_offsets_round_half_even(extra, expected_top):
    # column index encoded in the pixel values: the crop's first row tells the offset
    s = 8
    h = s + extra
    arr = np.zeros((h, s, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(h, dtype=np.uint8)[:, None]
    out = np.asarray(center_crop(Image.fromarray(arr), s))
    assert out.shape == (s, s, 3)
    assert out[0, 0, 0] == expected_top  # int(round(extra / 2)): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4


def test_center_crop_pads_small_images_with_zeros():
    img = Image.new("RGB", (5, 3), (200, 100, 50))
    out = np.asarray(center_crop(img, 8))
    assert out.shape == (8, 8, 3)
    # left pad (8-5)//2 = 1, right 2; top pad (8-3)//2 = 2, bottom 3
    assert (out[2:5, 1:6] == (200, 100, 50)).all()
    assert out[:2].sum() == 0 and out[5:].sum() == 0 and out[:, :1].sum() == 0 and out[:, 6:].sum() == 0


def test_eval_transform_normalisation_values():
    img = Image.new("RGB", (64, 40), (255, 0, 128))
    out = EvalTransform(PreprocessConfig(image_size=32))(img)
    expected = (np.array([255, 0, 128], dtype=np.float32) / np.float32(255) - MEAN) / STD
    np.testing.assert_allclose(out[:, 5, 7].numpy(), expected, rtol=0, atol=1e-6)
    assert torch.allclose(out, out[:, :1, :1].expand_as(out))


def test_eval_transform_squash_mode():
    img = textured(300, 200, seed=3)
    cfg = PreprocessConfig(image_size=64, resize_mode="squash", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = EvalTransform(cfg)(img)
    ref = np.asarray(img.resize((64, 64), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)


def test_eval_transform_rejects_unknown_modes():
    with pytest.raises(ValueError, match="resize_mode"):
        EvalTransform(PreprocessConfig(resize_mode="longest"))
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(PreprocessConfig(interpolation="cubic-ish"))


def test_eval_transform_on_real_ucm_image(shared_dir):
    folder = shared_dir / "data" / "ucm-captions"
    tifs = sorted(folder.rglob("*.tif"))[:2] if folder.is_dir() else []
    if not tifs:
        pytest.skip("UCM images not available")
    for p in tifs:
        img = load_image(p)
        assert img.mode == "RGB" and img.size == image_size(p)
        out = EvalTransform(PreprocessConfig())(img)
        np.testing.assert_allclose(out.numpy(), reference_eval(img, 224), atol=1e-6)


# -- TrainTransform --------------------------------------------------------------------------------
def dihedral(a: np.ndarray) -> list[np.ndarray]:
    out = []
    for flip in (False, True):
        b = a[:, ::-1] if flip else a
        out += [np.rot90(b, k, axes=(0, 1)) for k in range(4)]
    return out


def test_train_transform_shape_and_determinism():
    cfg = PreprocessConfig(image_size=48)
    tf = TrainTransform(cfg, color_jitter=0.2)
    img = textured(90, 70, seed=1)
    a = tf(img, rng=np.random.default_rng(5))
    b = tf(img, rng=np.random.default_rng(5))
    c = tf(img, rng=np.random.default_rng(6))
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the transform's own seeded generator: same seed -> same sequence
    t1, t2 = TrainTransform(cfg, seed=11), TrainTransform(cfg, seed=11)
    x1, y1 = t1(img), t2(img)
    assert torch.equal(x1, y1)
    assert not torch.equal(x1, t1(img))  # the instance's generator advances between calls


def test_flips_and_rotations_are_exact_pixel_permutations():
    s = 16
    img = textured(s, s, seed=2)
    src = np.asarray(img)
    tf = TrainTransform(PreprocessConfig(image_size=s), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    seen = set()
    for seed in range(60):
        out = tf.augment(img, np.random.default_rng(seed))
        matches = [k for k, d in enumerate(dihedral(src)) if np.array_equal(out, d)]
        assert matches, f"seed {seed}: output is not a flip/rotation of the input"
        seen.add(matches[0])
    assert seen == set(range(8))  # all eight symmetries of the square occur
    plain = TrainTransform(PreprocessConfig(image_size=s), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0, vflip=0, rot90=False)
    assert np.array_equal(plain.augment(img, np.random.default_rng(0)), src)


def test_random_resized_crop_params_follow_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(120, 80, (0.3, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 80 - h and 0 <= left <= 120 - w and h > 0 and w > 0
        assert 0.3 * 9600 * 0.9 <= h * w <= 9600
    # no attempt can fit -> central crop clamped to the ratio range
    assert random_resized_crop_params(100, 100, (1.0, 1.0), (10.0, 20.0), rng) == (45, 0, 10, 100)
    assert random_resized_crop_params(100, 100, (1.0, 1.0), (0.05, 0.1), rng) == (0, 45, 100, 10)
    assert random_resized_crop_params(40, 50, (2.0, 2.0), (0.5, 2.0), rng) == (0, 0, 50, 40)


def test_batch_collate():
    xs = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    assert batch_collate(xs).shape == (3, 3, 4, 4)
    imgs, ids = batch_collate([(x, i) for i, x in enumerate(xs)])
    assert imgs.shape == (3, 3, 4, 4) and ids == [0, 1, 2]
    with pytest.raises(ValueError):
        batch_collate([])


# -- load_image ------------------------------------------------------------------------------------
def test_rgb_rgba_l_p(tmp_path):
    rgb = textured(20, 10, seed=4)
    rgb.save(tmp_path / "rgb.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb.png")), np.asarray(rgb))

    arr = np.asarray(rgb).copy()
    alpha = np.zeros((10, 20), dtype=np.uint8)
    alpha[:, 10:] = 255
    alpha[0, 0] = 128
    Image.fromarray(np.dstack([arr, alpha]), "RGBA").save(tmp_path / "rgba.png")
    dropped = np.asarray(load_image(tmp_path / "rgba.png"))
    assert np.array_equal(dropped, arr)  # default: alpha ignored, as convert("RGB")
    black = np.asarray(load_image(tmp_path / "rgba.png", alpha="black"))
    assert black[:, 1:10].max() == 0 and np.array_equal(black[:, 10:], arr[:, 10:])
    assert np.array_equal(black[0, 0], (arr[0, 0].astype(int) * 128 + 127) // 255)

    grey = Image.fromarray(np.arange(200, dtype=np.uint8).reshape(10, 20), "L")
    grey.save(tmp_path / "l.png")
    g = np.asarray(load_image(tmp_path / "l.png"))
    assert g.shape == (10, 20, 3) and np.array_equal(g[..., 0], np.asarray(grey)) and np.array_equal(g[..., 0], g[..., 2])

    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=8)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "p.png")), np.asarray(pal.convert("RGB")))
    pal.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png", alpha="black")
    assert out.mode == "RGB"
    idx = np.asarray(pal)
    assert np.asarray(out)[idx == 0].max(initial=0) == 0  # transparent palette entry -> black

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    c = np.asarray(load_image(tmp_path / "cmyk.tif"))
    assert tuple(c[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_16bit_scaling(tmp_path, suffix):
    a = np.zeros((4, 5), dtype=np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 65535, 32768, 1000
    a[1:, :] = np.arange(15, dtype=np.uint16).reshape(3, 5) * 100 + 500
    p = tmp_path / f"i16{suffix}"
    Image.fromarray(a).save(p)
    out = np.asarray(load_image(p))
    assert out.shape == (4, 5, 3)
    assert tuple(out[0, 0]) == (255, 255, 255) and out[0, 1, 0] == 128 and out[0, 2, 0] == 4  # x / 65535 * 255
    mm = np.asarray(load_image(p, stretch="minmax"))[..., 0]
    assert mm[0, 0] == 255 and mm[0, 3] == 0  # 0 is the minimum
    pc = np.asarray(load_image(p, stretch="p2-98"))[..., 0]
    lo, hi = np.percentile(a.astype(float), (2, 98))
    expected = np.clip(np.rint((a.astype(float) - lo) / (hi - lo) * 255), 0, 255)
    assert np.array_equal(pc, expected.astype(np.uint8))
    with pytest.raises(ValueError, match="stretch"):
        load_image(p, stretch="gamma")


def test_float_and_int32_tiffs(tmp_path):
    f = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    Image.fromarray(f).save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif"))[..., 0]
    assert np.array_equal(out, np.rint(f.astype(np.float64) * 255).astype(np.uint8))
    g = (f * 1000 - 200).astype(np.float32)  # out of [0, 1]: min-max
    g[0, 0] = np.nan
    Image.fromarray(g).save(tmp_path / "g.tif")
    out = np.asarray(load_image(tmp_path / "g.tif"))[..., 0]
    assert out[0, 0] == 0 and out.max() == 255 and out[0, 1] == 0
    i = (np.arange(20, dtype=np.int32).reshape(4, 5) * 3000)
    Image.fromarray(i).save(tmp_path / "i.tif")
    out = np.asarray(load_image(tmp_path / "i.tif"))[..., 0]
    assert np.array_equal(out, np.rint(i / 65535 * 255).astype(np.uint8))  # 16-bit data stored as 32-bit


def test_to_uint8_signed_dtype_range():
    a = np.array([[-32768, 0, 32767]], dtype=np.int16)
    assert to_uint8(a).tolist() == [[0, 128, 255]]


def test_multiband_tiff_via_rasterio(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    import warnings

    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, size=(5, 12, 9), dtype=np.uint16)
    p = tmp_path / "five.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(p, "w", driver="GTiff", width=9, height=12, count=5, dtype="uint16") as ds:
            ds.write(data)
    assert image_size(p) == (9, 12)
    first = np.asarray(load_image(p, stretch="minmax"))
    assert first.shape == (12, 9, 3)
    for c in range(3):
        band = data[c].astype(float)
        exp = np.rint((band - band.min()) / (band.max() - band.min()) * 255).astype(np.uint8)
        assert np.array_equal(first[..., c], exp)
    picked = np.asarray(load_image(p, bands=(4, 3, 2)))
    assert np.array_equal(picked[..., 0], np.rint(data[4] / 65535 * 255).astype(np.uint8))
    assert np.array_equal(picked[..., 2], np.rint(data[2] / 65535 * 255).astype(np.uint8))
    with pytest.raises(DataError, match="five.tif.*out of range"):
        load_image(p, bands=(0, 1, 5))

    # 16-bit RGB: PIL would keep only the high byte; rasterio keeps the full range
    rgb16 = rng.integers(0, 65535, size=(3, 6, 7), dtype=np.uint16)
    q = tmp_path / "rgb16.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(q, "w", driver="GTiff", width=7, height=6, count=3, dtype="uint16", photometric="RGB") as ds:
            ds.write(rgb16)
    out = np.asarray(load_image(q))
    assert np.array_equal(out, np.rint(np.moveaxis(rgb16, 0, -1) / 65535 * 255).astype(np.uint8))


@pytest.mark.parametrize("content", [b"this is not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""])
def test_garbage_raises_dataerror_naming_file(tmp_path, content):
    p = tmp_path / "broken_17.png"
    p.write_bytes(content)
    with pytest.raises(DataError, match="broken_17.png"):
        load_image(p)
    with pytest.raises(DataError, match="broken_17.png"):
        image_size(p)
    t = tmp_path / "broken_18.tif"
    t.write_bytes(content)
    with pytest.raises(DataError, match="broken_18.tif"):
        load_image(t)


def test_truncated_and_missing_raise_dataerror(tmp_path):
    p = tmp_path / "cut.png"
    textured(64, 64).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert image_size(p) == (64, 64)  # the header is intact
    with pytest.raises(DataError, match=r"cut.png.*truncated"):
        load_image(p)
    j = tmp_path / "cut.jpg"
    textured(64, 64).save(j, quality=90)
    j.write_bytes(j.read_bytes()[:300])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(j)
    with pytest.raises(DataError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="nope.png"):
        image_size(tmp_path / "nope.png")


def test_image_size_is_header_only(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    textured(33, 21).save(p)
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("pixels decoded")))
    assert image_size(p) == (33, 21)
