"""Caption-file formats, one loader: the real RSITMD/UCM files plus hand-made bad inputs."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from rsitr.data.captions import detect_format, load_dataset, resolve_image_path, split_from_filename
from rsitr.data.labels import UCM_CLASSES, label_from_filename, read_labels_csv, ucm_order_label
from rsitr.utils.errors import DataError


def write_placeholder(path: Path) -> None:
    """An 8x8 image; the format follows the extension (TIFF, PNG, JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 7 % 256, 90, 30)).save(path)


def write_placeholders(folder: Path, names) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: write_placeholder(folder / n), sorted(set(names))))


@pytest.fixture(scope="module")
def captions_dir(shared_dir) -> Path:
    d = shared_dir / "data" / "captions"
    if not (d / "rsitmd_test.json").is_file():
        pytest.skip(f"real caption files not found in {d}")
    return d


@pytest.fixture(scope="module")
def rsitmd_test_images(captions_dir, tmp_path_factory) -> Path:
    """Placeholders for the 452 RSITMD test images, flat under <tmp>/images/ (RSITMD's layout)."""
    root = tmp_path_factory.mktemp("rsitmd")
    names = [Path(e["image"]).name for e in json.loads((captions_dir / "rsitmd_test.json").read_text())]
    write_placeholders(root / "images", names)
    return root


# -- formats ------------------------------------------------------------------------------------
def test_formats_detected_on_real_files(captions_dir, shared_dir, tmp_path):
    for split in ("train", "val", "test"):
        assert detect_format(captions_dir / f"rsitmd_{split}.json") == "pir"
    assert detect_format(captions_dir / "rsitmd_test.csv") == "iebaker-csv"
    ucm = shared_dir / "data" / "ucm-captions" / "dataset.json"
    if ucm.is_file():
        assert detect_format(ucm) == "karpathy"
    simple = tmp_path / "mine.csv"
    simple.write_text("image,caption,split\na.png,a red roof,train\na.png,  two cars  ,train\nb.png,a lake,test\n")
    assert detect_format(simple) == "csv"
    write_placeholders(tmp_path / "images", ["a.png", "b.png"])
    ds = load_dataset(simple)
    assert ds.format == "csv" and ds.splits == {"train": 1, "test": 1}
    assert ds.entries[0].captions == ["a red roof", "two cars"]  # stripped, otherwise raw
    assert ds.entries[0].path == tmp_path / "images" / "a.png"


def test_rsitmd_test_split_same_from_pir_json_and_iebaker_csv(captions_dir, rsitmd_test_images):
    root = rsitmd_test_images / "images"
    a = load_dataset(captions_dir / "rsitmd_test.json", image_root=root)
    b = load_dataset(captions_dir / "rsitmd_test.csv", image_root=root)
    assert (a.format, b.format) == ("pir", "iebaker-csv")
    assert len(a) == len(b) == 452 and a.n_captions == b.n_captions == 2260
    assert a.splits == b.splits == {"test": 452}  # JSON: from the test/ prefix; CSV: from the file name
    by_a = {e.path.name: e.captions for e in a.entries}
    by_b = {e.path.name: e.captions for e in b.entries}
    assert by_a == by_b
    assert {e.path for e in a.entries} == {e.path for e in b.entries}
    assert a.load_info.resolution["basename"] == 452


def test_pir_train_entries_merge_into_images(captions_dir):
    ds = load_dataset(captions_dir / "rsitmd_train.json", check_images=False)
    assert len(ds) == 3435 and ds.n_captions == 17175
    assert ds.splits == {"train": 3435}
    assert all(len(e.captions) == 5 for e in ds.entries)
    assert ds.entries[0].image_id == "train/bridge_942.tif" and ds.entries[0].label == "bridge"
    assert ds.load_info.resolution["unresolved"] == 3435  # check_images=False: no error, paths as written
    assert ds.classes is not None and len(ds.classes) == 33  # RSITMD's 32 classes + "plane" (6 train images)


def test_folder_of_pir_files_merges_splits(captions_dir):
    ds = load_dataset(captions_dir, check_images=False)
    assert ds.format == "pir" and ds.splits == {"test": 452, "train": 3435, "val": 856}


def test_image_root_resolves_foreign_absolute_paths(captions_dir, rsitmd_test_images):
    csv_file = captions_dir / "rsitmd_test.csv"
    # image_root = the images folder itself: only the base name matches
    ds = load_dataset(csv_file, image_root=rsitmd_test_images / "images")
    boat = next(e for e in ds.entries if e.image_id == "/home/mcx/RS/Datasets/RSITMD/images/boat_0.tif")
    assert boat.path == rsitmd_test_images / "images" / "boat_0.tif" and boat.label == "boat"
    assert ds.load_info.resolution == {"as-written": 0, "trailing": 0, "basename": 452, "unresolved": 0}
    # image_root = its parent: the trailing components images/boat_0.tif match
    ds = load_dataset(csv_file, image_root=rsitmd_test_images)
    assert ds.load_info.resolution["trailing"] == 452
    # without image_root nothing is found: the error names the file, line and the path looked for
    with pytest.raises(DataError, match=r"rsitmd_test\.csv: line 2: image file not found .*boat_0\.tif.*image_root"):
        load_dataset(csv_file)


def test_resolution_rules(tmp_path):
    write_placeholder(tmp_path / "root" / "test" / "a.tif")
    write_placeholder(tmp_path / "root" / "b.tif")
    write_placeholder(tmp_path / "root" / "sub" / "c.tif")
    roots = [tmp_path / "root"]
    assert resolve_image_path("test/a.tif", roots) == (tmp_path / "root/test/a.tif", "as-written")
    assert resolve_image_path(str(tmp_path / "root/b.tif"), [tmp_path]) == (tmp_path / "root/b.tif", "as-written")
    assert resolve_image_path("/elsewhere/x/sub/c.tif", roots) == (tmp_path / "root/sub/c.tif", "trailing")
    assert resolve_image_path("D:\\data\\x\\sub\\c.tif", roots) == (tmp_path / "root/sub/c.tif", "trailing")
    assert resolve_image_path("val/b.tif", roots) == (tmp_path / "root/b.tif", "basename")
    assert resolve_image_path("nope/z.tif", roots)[1] == "unresolved"


def test_split_rules(tmp_path):
    write_placeholders(tmp_path / "images", ["a.png", "b.png"])
    f = tmp_path / "pairs.csv"
    f.write_text("filename,title\na.png,one\nb.png,two\n")
    with pytest.raises(DataError, match=r"pairs\.csv.*no split.*split="):
        load_dataset(f)
    assert load_dataset(f, split="val").splits == {"val": 2}
    assert split_from_filename("rsitmd_test.csv") == "test" and split_from_filename("x_valid.json") == "val"
    assert split_from_filename("train_test.csv") is None and split_from_filename("latest.csv") is None
    pir = tmp_path / "p.json"
    pir.write_text(json.dumps([{"image": "test/a.png", "caption": "x"}]))
    assert load_dataset(pir).splits == {"test": 1}
    assert load_dataset(pir, split="train").splits == {"train": 1}  # split= replaces the prefix guess


# -- Karpathy details ---------------------------------------------------------------------------
def _karpathy(images) -> dict:
    return {"dataset": "x", "images": images}


def _img(name, split="train", sents=("a house", "a road"), **kw):
    return {"filename": name, "split": split, "sentences": [{"raw": s, "tokens": s.split()} for s in sents], **kw}


def test_karpathy_variants(tmp_path):
    write_placeholders(tmp_path / "images", ["1.tif", "2.tif", "3.tif"])
    write_placeholder(tmp_path / "imgs" / "4.tif")
    ann = tmp_path / "dataset_x.json"
    ann.write_text(json.dumps(_karpathy([
        _img("1.tif", "train", ["one"]),
        _img("2.tif", "restval", ["a", "b", "c", "d", "e", "f", "g"]),
        {"filename": "3.tif", "split": "test", "sentences": [{"tokens": ["a", "tiny", "pond"]}]},
        _img("4.tif", "val", filepath="imgs"),
    ])))
    ds = load_dataset(ann)
    assert ds.format == "karpathy"
    assert [e.split for e in ds.entries] == ["train", "train", "test", "val"]
    assert [len(e.captions) for e in ds.entries] == [1, 7, 1, 2]
    assert ds.entries[2].captions == ["a tiny pond"]
    assert ds.entries[3].image_id == "imgs/4.tif" and ds.entries[3].path == tmp_path / "imgs" / "4.tif"
    assert any("restval" in n for n in ds.load_info.notes)
    assert ds.classes is None  # numeric names carry no class


def test_nwpu_class_keyed_variant(tmp_path):
    write_placeholders(tmp_path / "images", ["airplane/airplane_001.jpg", "beach/beach_001.jpg"])
    ann = tmp_path / "dataset_nwpu.json"
    row = {"raw": "a plane", "raw_1": "two planes", "raw_2": "  ", "raw_3": "x", "raw_4": "y"}
    ann.write_text(json.dumps({"airplane": [{"filename": "airplane_001.jpg", "split": "train", **row}],
                               "beach": [{"filename": "beach_001.jpg", "split": "test", **{**row, "raw_2": "sand"}}]}))
    with pytest.raises(DataError, match=r"airplane\[0\] raw_2: empty caption"):
        load_dataset(ann)
    ds = load_dataset(ann, skip_bad=True)
    assert ds.format == "karpathy" and ds.classes == ["airplane", "beach"]
    assert ds.entries[0].captions == ["a plane", "two planes", "x", "y"] and len(ds.entries[1].captions) == 5
    assert len(ds.problems) == 1


# -- validation ---------------------------------------------------------------------------------
def _bad_dataset(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A small Karpathy dataset with one defect; returns (annotation, expected message regex)."""
    write_placeholders(tmp_path / "images", ["good_1.png", "good_2.png", "bad_3.png"])
    imgs = [_img("good_1.png"), _img("good_2.png", "test"), _img("bad_3.png", "val")]
    expect = ""
    if case == "missing image":
        (tmp_path / "images" / "bad_3.png").unlink()
        expect = r"images\[2\] \(bad_3\.png\): image file not found"
    elif case == "unreadable image":
        (tmp_path / "images" / "bad_3.png").write_bytes(b"\x00garbage, not a PNG" * 10)
        expect = r"images\[2\] \(bad_3\.png\): unreadable image .*bad_3\.png"
    elif case == "empty caption":
        imgs[2]["sentences"] = [{"raw": "   "}]
        expect = r"images\[2\] \(bad_3\.png\) sentences\[0\]: empty caption"
    elif case == "unknown split":
        imgs[2]["split"] = "holdout"
        expect = r"images\[2\] \(bad_3\.png\): unknown split 'holdout'"
    elif case == "duplicate id":
        imgs[2]["filename"] = "good_1.png"
        expect = r"images\[2\] \(good_1\.png\): duplicate image id 'good_1\.png' \(first listed at images\[0\]"
    ann = tmp_path / "dataset_bad.json"
    ann.write_text(json.dumps(_karpathy(imgs), indent=1))
    return ann, expect


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "empty caption", "unknown split", "duplicate id"])
def test_validation_errors_and_skip_bad(tmp_path, case):
    ann, expect = _bad_dataset(tmp_path, case)
    with pytest.raises(DataError, match=r"dataset_bad\.json: " + expect):
        load_dataset(ann)
    ds = load_dataset(ann, skip_bad=True)
    assert [e.image_id for e in ds.entries] == ["good_1.png", "good_2.png"]
    assert ds.problems and any(re.search(expect, p) for p in ds.problems)
    if case in ("missing image", "unreadable image"):  # check_images=False skips the file checks
        assert len(load_dataset(ann, check_images=False)) == 3


def test_skip_bad_keeps_image_with_some_good_captions(tmp_path):
    write_placeholders(tmp_path / "images", ["a_1.png"])
    ann = tmp_path / "p.json"
    ann.write_text(json.dumps([{"image": "train/a_1.png", "caption": ["ok", ""]}, {"image": "train/a_1.png", "caption": None}]))
    with pytest.raises(DataError, match=r"p\.json: entry 0 \(train/a_1\.png\) caption\[1\]: empty caption"):
        load_dataset(ann)
    ds = load_dataset(ann, skip_bad=True)
    assert ds.entries[0].captions == ["ok"] and len(ds.problems) == 2
    assert "entry 1" in ds.problems[1] and "NoneType" in ds.problems[1]


def test_malformed_files(tmp_path):
    j = tmp_path / "dataset.json"
    j.write_text('{"images": [\n  {"filename": "a.png",\n   "split": "train" "sentences": []}\n]}')
    with pytest.raises(DataError, match=r"dataset\.json: malformed JSON at line 3 column"):
        load_dataset(j, skip_bad=True)  # malformed files are never skipped
    j.write_text('{"pictures": []}')
    with pytest.raises(DataError, match=r"dataset\.json: unrecognised JSON layout"):
        load_dataset(j)
    c = tmp_path / "x.csv"
    c.write_text('image,caption,split\na.png,"an open quote,train\n')
    with pytest.raises(DataError, match=r"x\.csv: malformed CSV near line 2"):
        load_dataset(c)
    c.write_text("image,caption,split\na.png,one,train\na.png,two, three,train\nb.png\n")
    with pytest.raises(DataError, match=r"x\.csv: line 3: 4 fields, header has 3"):
        load_dataset(c, check_images=False)
    ds = load_dataset(c, check_images=False, skip_bad=True)
    assert ds.entries[0].captions == ["one"] and len(ds.problems) == 2 and "line 4" in ds.problems[1]
    c.write_text("picture,words\n")
    with pytest.raises(DataError, match=r"x\.csv: unrecognised CSV header"):
        load_dataset(c)
    with pytest.raises(DataError, match="format='coco'"):
        load_dataset(j, format="coco")
    with pytest.raises(DataError, match="no such annotation"):
        load_dataset(tmp_path / "absent.json")


def test_forced_format(tmp_path):
    f = tmp_path / "ann.txt"
    f.write_text("filename,title\n/x/y/a_1.png,hello\n")
    write_placeholder(tmp_path / "a_1.png")
    assert load_dataset(f, format="iebaker-csv", split="test").format == "iebaker-csv"
    with pytest.raises(DataError, match="iEBAKER CSV needs the header"):
        g = tmp_path / "g.csv"
        g.write_text("image,caption\na_1.png,x\n")
        load_dataset(g, format="iebaker-csv", split="test")



def test_format_registry(tmp_path, monkeypatch):
    from rsitr.data.captions import FORMATS, CaptionFormat, list_formats, register_format, registry

    assert list_formats() == list(FORMATS) == ["karpathy", "pir", "iebaker-csv", "csv"]  # detection order
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))  # the test's format goes away after it

    @register_format("pairs")
    class Pairs(CaptionFormat):  # {"pairs": [[image, caption], ...]}, all test images
        container = "json"
        expects = "a {'pairs': [[image, caption], ...]} object"

        def recognises(self, path, obj):
            return isinstance(obj, dict) and isinstance(obj.get("pairs"), list)

        def parse(self, path, obj, ctx):
            from rsitr.data.captions.base import RawImage

            out = {}
            for i, (img, cap) in enumerate(obj["pairs"]):
                r = out.setdefault(img, RawImage(image_id=img, written=img, split="test", split_field=True, where=f"{path}: pairs[{i}]"))
                r.captions.append((f"{path}: pairs[{i}]", cap))
            return list(out.values())

    assert list_formats()[-1] == "pairs"
    f = tmp_path / "ann.json"
    f.write_text(json.dumps({"pairs": [["a_1.png", "a red car ."], ["a_1.png", "one car ."], ["b_2.png", "a lake ."]]}))
    write_placeholders(tmp_path, ["a_1.png", "b_2.png"])
    assert detect_format(f) == "pairs"
    ds = load_dataset(f)
    assert ds.format == "pairs" and [(e.image_id, e.captions, e.label) for e in ds.entries] == [
        ("a_1.png", ["a red car .", "one car ."], "a"), ("b_2.png", ["a lake ."], "b")]
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(DataError, match=r"unrecognised JSON layout \(list\); expected .* or a \{'pairs'"):
        detect_format(tmp_path / "x.json")
    with pytest.raises(ValueError, match="already registered"):
        register_format("pairs")(Pairs)

# -- labels -------------------------------------------------------------------------------------
def test_labels_from_file_names():
    assert label_from_filename("parking_229.tif") == "parking"
    assert label_from_filename("test/denseresidential_12.jpg") == "denseresidential"
    assert label_from_filename("/home/u/NWPU/basketball_court_001.jpg") == "basketball_court"
    assert label_from_filename("agricultural07.tif") == "agricultural"
    assert label_from_filename("00001.jpg") is None and label_from_filename("1.tif") is None


def test_labels_csv_and_ucm_order(tmp_path):
    assert ucm_order_label("1.tif") == "agricultural" and ucm_order_label("100.tif") == "agricultural"
    assert ucm_order_label("101.tif") == "airplane" and ucm_order_label("2100.tif") == "tenniscourt"
    assert len(UCM_CLASSES) == 21 and list(UCM_CLASSES) == sorted(UCM_CLASSES)
    with pytest.raises(DataError, match="2101.tif"):
        ucm_order_label("2101.tif")

    write_placeholders(tmp_path / "images", ["1.tif", "150.tif", "2100.tif"])
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps(_karpathy([_img("1.tif"), _img("150.tif", "val"), _img("2100.tif", "test")])))
    ds = load_dataset(tmp_path)  # a folder: dataset.json + images/
    assert ds.classes is None and all(e.label is None for e in ds.entries)
    ds = load_dataset(tmp_path, labels="ucm-order")
    assert [e.label for e in ds.entries] == ["agricultural", "airplane", "tenniscourt"]
    (tmp_path / "labels.csv").write_text("filename,class,extra\n1.tif,x,1\n150.tif,y,2\n2100.tif,x,3\n")
    assert read_labels_csv(tmp_path / "labels.csv") == {"1.tif": "x", "150.tif": "y", "2100.tif": "x"}
    ds = load_dataset(tmp_path)  # labels.csv next to the annotation is picked up
    assert [e.label for e in ds.entries] == ["x", "y", "x"] and ds.classes == ["x", "y"]
    assert load_dataset(tmp_path, labels="none").classes is None
    other = tmp_path / "other.csv"
    other.write_text("image,label\nimages/1.tif,z\n")  # matched by base name; others unlabelled
    ds = load_dataset(ann, labels=other)
    # partly labelled: the classes of the labelled images; the others get -1 (skipped, never guessed)
    assert [e.label for e in ds.entries] == ["z", None, None] and ds.classes == ["z"]
    assert ds.label_indices() == [0, -1, -1] and ds.label_indices(["y", "z"]) == [1, -1, -1]
    other.write_text("image,label\n1.tif,a\n1.tif,b\n")
    with pytest.raises(DataError, match=r"other\.csv: line 3: '1\.tif' labelled both"):
        load_dataset(ann, labels=other)
    with pytest.raises(DataError, match="labels='bogus'"):
        load_dataset(ann, labels="bogus")


def test_ambiguous_folder(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_karpathy([])))
    (tmp_path / "b.json").write_text(json.dumps(_karpathy([])))
    with pytest.raises(DataError, match=r"several annotation files \(a\.json, b\.json\)"):
        load_dataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no annotation file"):
        load_dataset(empty)
