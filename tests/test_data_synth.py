"""The synthetic benchmark: layout, determinism, noise marking, and captions true of the scene."""
from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsitr.data import synth
from rsitr.data.captions import load_dataset

N, SEED, SIZE = 60, 3, 64


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.write_synth(out, n_images=N, seed=SEED, image_size=SIZE)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- layout ----------------------------------------------------------------------------------------
def test_layout(bench):
    obj = json.loads((bench / "dataset_synth.json").read_text())
    assert obj["dataset"] == "synth"
    images = obj["images"]
    assert len(images) == N
    sentids = []
    for i, im in enumerate(images):
        assert set(im) >= {"filename", "imgid", "split", "sentids", "sentences"}
        assert im["imgid"] == i and (bench / "images" / im["filename"]).is_file()
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid", "noisy"} and s["imgid"] == i and s["noisy"] is False
            assert s["tokens"] == synth.tokens_of(s["raw"]) and s["tokens"]
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids += im["sentids"]
    assert sentids == list(range(5 * N))
    splits = Counter(im["split"] for im in images)
    assert set(splits) == {"train", "val", "test"} and min(splits.values()) >= 1
    assert splits["train"] == N - round(0.15 * N) * 2
    with open(bench / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["filename"] for r in rows] == [im["filename"] for im in images]
    for r in rows:
        assert r["filename"].rsplit("_", 1)[0] == r["class"]
    assert len({r["class"] for r in rows}) >= 10
    assert sorted(p.name for p in (bench / "images").iterdir()) == sorted(r["filename"] for r in rows)
    with Image.open(bench / "images" / rows[0]["filename"]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not [p for p in bench.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_loads_with_labels_from_csv(bench):
    ds = load_dataset(bench / "dataset_synth.json")
    assert len(ds) == N and ds.n_captions == 5 * N
    assert ds.classes is not None and len(ds.classes) >= 10
    for e in ds.entries:
        assert e.label == e.image_id.rsplit("_", 1)[0]


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_byte_identical_any_workers(bench, tmp_path):
    again = synth.write_synth(tmp_path / "again", n_images=N, seed=SEED, image_size=SIZE, workers=1).parent
    assert files_of(again) == files_of(bench)
    threaded = synth.write_synth(tmp_path / "threaded", n_images=N, seed=SEED, image_size=SIZE, workers=3).parent
    assert files_of(threaded) == files_of(bench)


# sha256 of a small benchmark (28 images = each class twice, seed 3, 30% noise, 32 px) as the module
# wrote it before it was split into a package: any change to the order of the draws, the vocabulary,
# the drawing or the writer shows here. Pixels are hashed decoded (not the PNG bytes), so a
# different zlib does not fail the test.
PINNED = {
    "dataset_synth.json": "12c136ac300712ebd89f0e19f55f080ecf1ebebfc3fbc500e96a9cea0e58a806",
    "labels.csv": "e59f1cd66d970e455f5433ee64445339cc12937abc65374d5d9074391886f9dd",
    "pixels": "a8533aa32e69ddcb5c385300ec4df801781a01751ab454cf6ec5853cf1d5ba91",
}


def test_pinned_output(tmp_path):
    out = synth.write_synth(tmp_path / "pinned", n_images=28, seed=3, noise_frac=0.3, image_size=32, workers=1).parent
    pixels = hashlib.sha256()
    for png in sorted((out / "images").iterdir()):
        pixels.update(png.name.encode())
        pixels.update(np.asarray(Image.open(png).convert("RGB")).tobytes())
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("dataset_synth.json", "labels.csv")}
    got["pixels"] = pixels.hexdigest()
    assert got == PINNED

def test_other_seed_differs(bench, tmp_path):
    other = synth.write_synth(tmp_path / "other", n_images=N, seed=SEED + 1, image_size=SIZE).parent
    a, b = files_of(bench), files_of(other)
    assert a["dataset_synth.json"] != b["dataset_synth.json"]
    assert a["labels.csv"] == b["labels.csv"]  # classes are assigned in turn; the images differ
    assert all(a[k] != b[k] for k in a if k.startswith("images/"))


def test_images_and_captions_differ_within_a_class(bench):
    obj = json.loads((bench / "dataset_synth.json").read_text())
    by_class: dict[str, list] = {}
    for im in obj["images"]:
        by_class.setdefault(im["filename"].rsplit("_", 1)[0], []).append(im)
    for cls, ims in by_class.items():
        pixels = [np.asarray(Image.open(bench / "images" / im["filename"])) for im in ims]
        for i in range(len(pixels)):
            for j in range(i + 1, len(pixels)):
                assert not np.array_equal(pixels[i], pixels[j]), cls
        caption_sets = {frozenset(s["raw"] for s in im["sentences"]) for im in ims}
        assert len(caption_sets) == len(ims), f"{cls}: two images share all five captions"


def test_not_separable_by_mean_colour():
    # a nearest-class-mean classifier on the mean RGB must be far from perfect
    feats, labels = [], []
    for i in range(14 * 6):
        cls = synth.CLASSES[i % 14]
        _, _, img = synth.generate(i, cls, 0, 48)
        feats.append(np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0))
        labels.append(cls)
    feats = np.array(feats)
    labels = np.array(labels)
    correct = 0
    for k in range(len(feats)):  # leave-one-out
        mask = np.arange(len(feats)) != k
        means = {c: feats[mask & (labels == c)].mean(0) for c in synth.CLASSES}
        pred = min(means, key=lambda c: np.linalg.norm(feats[k] - means[c]))
        correct += pred == labels[k]
    assert correct / len(feats) < 0.8


# -- noise -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("frac", [0.2, 0.5])
def test_noise_marks_train_captions_only(bench, tmp_path, frac):
    ann = synth.write_synth(tmp_path / "noisy", n_images=N, seed=SEED, image_size=SIZE, noise_frac=frac)
    clean = json.loads((bench / "dataset_synth.json").read_text())["images"]
    noisy = json.loads(ann.read_text())["images"]
    n_train_caps = sum(len(im["sentences"]) for im in noisy if im["split"] == "train")
    flags = [s["noisy"] for im in noisy for s in im["sentences"]]
    assert sum(flags) == round(frac * n_train_caps)
    class_of = [im["filename"].rsplit("_", 1)[0] for im in clean]
    for i, (c_im, n_im) in enumerate(zip(clean, noisy)):
        marked = [s["noisy"] for s in n_im["sentences"]]
        if n_im["split"] != "train":
            assert not any(marked)
        assert sum(marked) <= 4
        for cs, ns in zip(c_im["sentences"], n_im["sentences"]):
            if not ns["noisy"]:
                assert ns["raw"] == cs["raw"]
                continue
            other_class = {s["raw"] for j, im in enumerate(clean) if class_of[j] != class_of[i] for s in im["sentences"]}
            assert ns["raw"] in synth.GENERIC_NOISE or ns["raw"] in other_class


def test_noise_never_replaces_all_five(tmp_path):
    ann = synth.write_synth(tmp_path / "all", n_images=20, seed=1, image_size=32, noise_frac=1.0)
    for im in json.loads(ann.read_text())["images"]:
        n = sum(s["noisy"] for s in im["sentences"])
        assert n == (4 if im["split"] == "train" else 0)


# -- captions are true of the scene ----------------------------------------------------------------
def _noun_table():
    table = []
    for kind, forms in synth.NOUNS.items():
        for sing, plur in forms:
            table.append((sing.split(), kind))
            table.append((plur.split(), kind))
    return sorted(table, key=lambda t: -len(t[0]))


NOUN_TABLE = _noun_table()
NUMBERS = {w: i for i, w in enumerate(synth.NUMBER_WORDS) if i > 0}


def parsed_counts(text: str):
    """(n, kind, colour) for every "<number> [colour] <noun> [with [a] <colour> roof(s)]"."""
    toks = text.replace(",", " ").split()
    out = []
    for i, t in enumerate(toks):
        if t not in NUMBERS:
            continue
        j, colour = i + 1, None
        if j < len(toks) and toks[j] in synth.COLORS:
            colour, j = toks[j], j + 1
        kind = None
        for words, k in NOUN_TABLE:
            if toks[j : j + len(words)] == words:
                kind, j = k, j + len(words)
                break
        if kind is None:
            continue
        if toks[j : j + 1] == ["with"]:
            m = j + 1 + (toks[j + 1 : j + 2] == ["a"])
            if m + 1 < len(toks) and toks[m] in synth.COLORS and toks[m + 1] in ("roof", "roofs"):
                colour = toks[m]
        out.append((NUMBERS[t], kind, colour))
    return out


def check_claim(scene: synth.Scene, claim: tuple) -> None:
    what = claim[0]
    if what == "count":
        _, kind, colour, n = claim
        assert scene.count(kind, colour) == n
    elif what == "region":
        _, kind, colour, (col, row) = claim
        objs = scene.of(kind, colour)
        assert objs
        for o in objs:  # independent of synth.region_of: thirds of the tile
            assert col / 3 <= o.x < (col + 1) / 3 and row / 3 <= o.y < (row + 1) / 3
    elif what == "side":
        _, kind, colour, landmark, side = claim
        lm = scene.landmarks[landmark]
        for o in scene.of(kind, colour):
            # centre line at the object's position along the band, the band's half width, the object's radius
            t = o.y if lm["orient"] == "vertical" else o.x
            c = synth.band_center(lm, t)
            pos = o.x if lm["orient"] == "vertical" else o.y
            if side in ("left", "top"):
                assert pos + o.radius < c - lm["w"] / 2
            else:
                assert pos - o.radius > c + lm["w"] / 2
    elif what == "landmark":
        _, name, key, value = claim
        assert scene.landmarks[name][key] == value
    else:
        raise AssertionError(f"unknown claim {claim}")


def test_caption_facts_match_the_scene():
    n_counts = 0
    kinds_seen = set()
    for i in range(14 * 10):
        cls = synth.CLASSES[i % 14]
        scene, caps, _ = synth.generate(i, cls, 7, 64)
        assert len(caps) == 5 and len({c.text for c in caps}) == 5
        for cap in caps:
            for claim in cap.claims:
                check_claim(scene, claim)
            for n, kind, colour in parsed_counts(cap.text):
                assert scene.count(kind, colour) == n, (cls, cap.text)
                n_counts += 1
                kinds_seen.add(kind)
    assert n_counts > 150  # the check really ran on many count phrases
    assert kinds_seen >= {"car", "building", "house", "tree", "ship", "airplane", "tank", "field"}


def test_count_words_follow_the_drawn_objects():
    # the counted objects are really in the description; and captions say "three red cars" style
    rng = np.random.default_rng(0)
    scene = synth.Scene("parking", (0, 0, 0))
    for col, n in (("red", 3), ("white", 1)):
        for _ in range(n):
            scene.objects.append(synth.Obj("car", col, 0.5, 0.5, 0.05, 0.02))
    text, claims = synth.count_phrase("car", scene.count("car", "red"), rng, "red")
    assert text.split()[:2] == ["three", "red"] and claims == [("count", "car", "red", 3)]
    text, claims = synth.count_phrase("ship", 1, rng, "white")
    assert text.split()[1:] == ["white", text.split()[-1]] and text.split()[0] in ("a", "one")
    text, claims = synth.count_phrase("car", 15, rng)
    assert text.startswith("many ") and claims == []


def test_spatial_captions_present():
    texts = []
    for i in range(14 * 6):
        _, caps, _ = synth.generate(i, synth.CLASSES[i % 14], 11, 48)
        texts += [c.text for c in caps]
    joined = " ".join(texts)
    for phrase in ("to the left of", "corner", "above the", "on the left side"):
        assert phrase in joined


# -- robustness --------------------------------------------------------------------------------------
def test_rewrite_replaces_old_images(tmp_path):
    out = tmp_path / "d"
    synth.write_synth(out, n_images=30, seed=0, image_size=32)
    synth.write_synth(out, n_images=12, seed=0, image_size=32)
    names = {im["filename"] for im in json.loads((out / "dataset_synth.json").read_text())["images"]}
    assert {p.name for p in (out / "images").iterdir()} == names and len(names) == 12


def test_crash_leaves_no_json(tmp_path, monkeypatch):
    out = tmp_path / "d"
    synth.write_synth(out, n_images=20, seed=0, image_size=32)
    calls = {"n": 0}
    real = synth.render

    def flaky(scene, size, rng):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk on fire")
        return real(scene, size, rng)

    monkeypatch.setattr(synth.writer, "render", flaky)  # what generate() draws with
    with pytest.raises(RuntimeError, match="disk on fire"):
        synth.write_synth(out, n_images=20, seed=5, image_size=32, workers=1)
    assert not (out / "dataset_synth.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        synth.write_synth(tmp_path / "x", n_images=2)
    with pytest.raises(ValueError, match="noise_frac"):
        synth.write_synth(tmp_path / "x", n_images=10, noise_frac=1.5)


def test_cli_entry(tmp_path, capsys):
    from rsitr.cli import main

    assert main(["-q", "data", "synth", "--out", str(tmp_path / "cli"), "--images", "15", "--seed", "2", "--noise-frac", "0.1",
                 "--size", "32"]) == 0
    assert "15 synthetic images" in capsys.readouterr().out
    obj = json.loads((tmp_path / "cli" / "dataset_synth.json").read_text())
    assert len(obj["images"]) == 15 and any(s["noisy"] for im in obj["images"] for s in im["sentences"])
