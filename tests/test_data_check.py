"""``rsitr data check``: the report, its counts, and the exit code."""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rsitr.cli.data import add_data_check_args, run_data_check
from rsitr.data.check import check_dataset, duplicate_captions, exit_code, render_check
from rsitr.data.captions import load_dataset
from rsitr.utils.errors import DataError
from PIL import Image

def write_placeholder(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 90, 30)).save(path)


def write_placeholders(folder: Path, names) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: write_placeholder(folder / n), sorted(set(names))))


REQUIRED = {"format", "images", "captions", "splits", "captions_per_image", "classes", "duplicate_captions",
            "missing_images", "missing_examples", "unreadable_images", "unreadable_examples", "resolution", "seconds"}


@pytest.fixture(scope="module")
def rsitmd_test(shared_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(real rsitmd_test.json, folder with its 452 placeholders under images/)."""
    ann = shared_dir / "data" / "captions" / "rsitmd_test.json"
    if not ann.is_file():
        pytest.skip(f"real caption file not found: {ann}")
    root = tmp_path_factory.mktemp("rsitmd_check")
    write_placeholders(root / "images", [Path(e["image"]).name for e in json.loads(ann.read_text())])
    return ann, root


def test_missing_images_counted_and_named(rsitmd_test, tmp_path):
    ann, root = rsitmd_test
    empty = tmp_path / "nothing"
    empty.mkdir()
    r = check_dataset(ann, image_root=empty)  # does not raise
    assert REQUIRED <= set(r)
    assert r["format"] == "pir" and r["images"] == 452 and r["captions"] == 2260
    assert r["missing_images"] == 452 and r["resolution"]["unresolved"] == 452
    assert r["missing_examples"][0]["image"] == "test/parking_229.tif"
    assert exit_code(r) == 1
    assert "missing images: 452" in render_check(r)

    r = check_dataset(ann, image_root=root / "images")
    assert r["missing_images"] == 0 and r["unreadable_images"] == 0 and exit_code(r) == 0
    assert {k: v for k, v in r["splits"]["test"].items() if k in ("images", "captions")} == {"images": 452, "captions": 2260}
    assert set(r["splits"]) == {"test"} and r["splits"]["test"]["class_tv_to_test"] == 0.0
    assert r["captions_per_image"] == {"5": 452}
    assert r["classes"] is not None and sum(r["classes"].values()) == 452 and r["classes"]["boat"] == 1
    json.dumps(r)  # JSON-able


def test_some_missing_some_unreadable(tmp_path):
    write_placeholders(tmp_path / "images", ["a_1.png", "b_2.png", "c_3.png"])
    (tmp_path / "images" / "c_3.png").write_bytes(b"not an image at all")
    ann = tmp_path / "pairs.csv"
    ann.write_text("image,caption,split\na_1.png,x,train\nb_2.png,y,val\nc_3.png,z,test\nd_4.png,w,test\nd_4.png,v,test\n")
    r = check_dataset(ann)
    assert (r["images"], r["captions"], r["missing_images"], r["unreadable_images"]) == (4, 5, 1, 1)
    assert r["missing_examples"][0]["image"] == "d_4.png"
    assert r["unreadable_examples"][0]["image"] == "c_3.png"
    assert r["captions_per_image"] == {"1": 3, "2": 1}
    assert r["splits"]["test"] == {"images": 2, "captions": 3, "distinct_per_image": {"1": 1, "2": 1}, "class_tv_to_test": 0.0}
    assert r["splits"]["train"]["distinct_per_image"] == {"1": 1}
    assert r["resolution"]["as-written"] == 3 and r["resolution"]["unresolved"] == 1  # found in images/
    assert exit_code(r) == 1
    text = render_check(r)
    assert "d_4.png" in text and "c_3.png" in text and "PROBLEMS FOUND" in text


def test_duplicate_caption_counts(tmp_path):
    write_placeholders(tmp_path / "images", ["a.png", "b.png", "c.png"])
    ann = tmp_path / "dup.csv"
    ann.write_text("image,caption,split\n"
                   "a.png,A dog.,train\na.png,a  dog.,train\na.png,A cat,train\n"     # within 1 ("a dog." twice)
                   "b.png,a dog. ,train\nb.png,Bird,train\n"                           # within 0
                   "c.png,bird,test\nc.png,BIRD,test\nc.png,Fish,test\n")              # within 1 ("bird" twice)
    r = check_dataset(ann)
    # across: "a dog." is under a (x2) and b (x1) -> 3; "bird" under b (x1) and c (x2) -> 3
    assert r["duplicate_captions"] == {"within_image": 2, "across_images": 6}
    assert duplicate_captions(load_dataset(ann)) == {"within_image": 2, "across_images": 6}
    assert r["classes"] is None and exit_code(r) == 0


def test_entry_problems_reported_not_raised(tmp_path):
    write_placeholders(tmp_path / "images", ["a.png", "b.png"])
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps({"images": [
        {"filename": "a.png", "split": "train", "sentences": [{"raw": "ok"}, {"raw": ""}]},
        {"filename": "b.png", "split": "holdout", "sentences": [{"raw": "ok"}]}]}))
    r = check_dataset(ann)
    assert r["problems"] == 2 and r["images"] == 1 and exit_code(r) == 1
    text = "\n".join(r["problem_examples"])
    assert "images[0] (a.png) sentences[1]: empty caption" in text and "images[1] (b.png): unknown split 'holdout'" in text


def test_malformed_annotation_raises(tmp_path):
    ann = tmp_path / "dataset.json"
    ann.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"dataset\.json: malformed JSON at line 1"):
        check_dataset(ann)


def test_cli_entry(tmp_path, capsys):
    write_placeholder(tmp_path / "images" / "a_1.png")
    ann = tmp_path / "pairs.csv"
    ann.write_text("image,caption,split\na_1.png,x,train\nmissing_2.png,y,test\n")
    p = argparse.ArgumentParser()
    add_data_check_args(p)
    assert run_data_check(p.parse_args([str(ann), "--json", "--workers", "2"])) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["missing_images"] == 1 and out["format"] == "csv"
    assert run_data_check(p.parse_args([str(ann), "--format", "csv", "--image-root", str(tmp_path / "images")])) == 1
    assert "missing images: 1" in capsys.readouterr().out
    (tmp_path / "ok.csv").write_text("filename,title\n/far/away/a_1.png,x\n")
    assert run_data_check(p.parse_args([str(tmp_path / "ok.csv"), "--split", "train"])) == 0
    assert "status: OK" in capsys.readouterr().out


def test_distinct_captions_and_class_mix_per_split(tmp_path):
    """The split statistics that show how RSICD's test split was drawn: distinct sentences per image
    (five copies of one sentence count 1) and each split's class-mix distance to test."""
    write_placeholders(tmp_path / "images", ["a_1.png", "a_2.png", "b_3.png", "a_4.png"])
    ann = tmp_path / "pairs.csv"
    ann.write_text("image,caption,split\n"
                   "a_1.png,A plane .,train\na_1.png,a plane,train\n"
                   "a_2.png,x,train\na_2.png,y,train\n"
                   "b_3.png,p,test\nb_3.png,q,test\n"
                   "a_4.png,r,test\na_4.png,s,test\n")
    r = check_dataset(ann)  # classes from the file names: a, a | b, a
    tr, te = r["splits"]["train"], r["splits"]["test"]
    assert tr["distinct_per_image"] == {"1": 1, "2": 1} and te["distinct_per_image"] == {"2": 2}
    assert te["class_tv_to_test"] == 0.0 and tr["class_tv_to_test"] == 0.5
    assert "distinct captions per image: 1: 1, 2: 1" in render_check(r)
