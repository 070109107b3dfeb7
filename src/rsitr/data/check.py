"""``rsitr data check PATH``: what a caption dataset holds and what is wrong with it.

The report (a JSON-able dict) has: format, files, images, captions, splits
({name: {"images", "captions", "distinct_per_image": {n distinct sentences: n images},
"class_tv_to_test": total variation distance of the split's class histogram to test's, when both
have labels}}), captions_per_image ({n_captions: n_images}, string keys),
classes ({name: n_images} or null when any image lacks a label), label_source,
duplicate_captions ({"within_image", "across_images"}), missing_images / missing_examples,
unreadable_images / unreadable_examples, resolution (images found by each path rule, see
:mod:`rsitr.data.captions`), image_roots, problems / problem_examples (bad annotation entries:
empty caption, unknown split, duplicate id...), notes, seconds.

Malformed annotations (JSON/CSV that cannot be parsed, unknown layout) raise ``DataError``.
Missing or unreadable images never raise: they are counted and named. Bad entries are reported
under ``problems`` instead of stopping at the first one. :func:`exit_code` is 1 when an image is
missing or unreadable, and also when an entry problem was found (``load_dataset`` would refuse
such a file without ``skip_bad``), else 0.

Duplicate captions: text is normalised by lower-casing, collapsing runs of whitespace to one
space and trimming. ``within_image`` = per image, captions minus distinct captions, summed;
``across_images`` = captions whose normalised text also appears under another image.
"""
from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from typing import Any

from rsitr.data.captions import load_with_info
from rsitr.data.types import CaptionDataset, distinct_captions, normalise_caption

N_EXAMPLES = 5


def duplicate_captions(ds: CaptionDataset) -> dict[str, int]:
    within = 0
    owners: dict[str, set[int]] = defaultdict(set)
    for i, e in enumerate(ds.entries):
        norm = [normalise_caption(c) for c in e.captions]
        within += len(norm) - len(set(norm))
        for n in norm:
            owners[n].add(i)
    across = sum(1 for e in ds.entries for c in e.captions if len(owners[normalise_caption(c)]) > 1)
    return {"within_image": within, "across_images": across}


def check_dataset(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    workers: int | None = None,
    labels: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load ``path`` (file or folder) keeping entries with missing/unreadable images, check
    every image header in threads, and return the report described in the module docstring."""
    t0 = time.perf_counter()
    ds, info = load_with_info(path, format=format, image_root=image_root, split=split, labels=labels,
                     skip_entries=True, images="keep", check_images=True, workers=workers)
    splits: dict[str, dict[str, int]] = {}
    for e in ds.entries:
        s = splits.setdefault(e.split, {"images": 0, "captions": 0, "distinct_per_image": Counter()})
        s["images"] += 1
        s["captions"] += len(e.captions)
        s["distinct_per_image"][distinct_captions(e.captions)] += 1
    for s in splits.values():
        s["distinct_per_image"] = {str(k): v for k, v in sorted(s["distinct_per_image"].items())}
    _class_mix(ds, splits)
    hist = Counter(len(e.captions) for e in ds.entries)
    classes = None
    if ds.classes is not None:
        counts = Counter(e.label for e in ds.entries)
        classes = {c: counts[c] for c in ds.classes}
    labelled = sum(e.label is not None for e in ds.entries)

    def examples(recs: list[tuple[str, str, str]]) -> list[dict[str, str]]:
        return [{"image": i, "path": p, "reason": r} for i, p, r in recs[:N_EXAMPLES]]

    return {
        "path": str(path),
        "format": ds.format,
        "files": [str(f) for f in info.files],
        "images": len(ds),
        "captions": ds.n_captions,
        "splits": dict(sorted(splits.items(), key=lambda kv: ("train", "val", "test").index(kv[0]))),
        "captions_per_image": {str(k): hist[k] for k in sorted(hist)},
        "classes": classes,
        "labelled_images": labelled,
        "label_source": info.label_source,
        "duplicate_captions": duplicate_captions(ds),
        "missing_images": len(info.missing),
        "missing_examples": examples(info.missing),
        "unreadable_images": len(info.unreadable),
        "unreadable_examples": examples(info.unreadable),
        "resolution": dict(info.resolution),
        "image_roots": [str(r) for r in info.image_roots],
        "problems": len(info.problems),
        "problem_examples": info.problems[:N_EXAMPLES],
        "notes": list(info.notes),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _class_mix(ds: CaptionDataset, splits: dict[str, dict[str, Any]]) -> None:
    """Each split's total variation distance to the test split's class histogram (labelled images;
    the unlabelled ones count as one class), when there is a test split and labels."""
    if "test" not in splits or ds.classes is None:
        return
    hist: dict[str, Counter] = defaultdict(Counter)
    for e in ds.entries:
        hist[e.split][e.label] += 1
    test, nt = hist["test"], sum(hist["test"].values())
    for name, h in hist.items():
        n = sum(h.values())
        splits[name]["class_tv_to_test"] = round(0.5 * sum(abs(h[c] / n - test[c] / nt) for c in set(h) | set(test)), 4)


def exit_code(report: dict[str, Any]) -> int:
    """1 when an image is missing or unreadable (or an annotation entry is bad), else 0."""
    return 1 if report["missing_images"] or report["unreadable_images"] or report.get("problems") else 0


def render_check(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    r = report
    lines = [f"{r['path']}: {r['format']} format ({', '.join(r['files'])})",
             f"  images {r['images']:,}   captions {r['captions']:,}   ({r['seconds']:.2f}s)"]
    for name, s in r["splits"].items():
        lines.append(f"  {name:<6} {s['images']:>7,} images {s['captions']:>8,} captions   distinct captions per image: "
                     + ", ".join(f"{k}: {v:,}" for k, v in s["distinct_per_image"].items())
                     + (f"   class mix vs test: TV {s['class_tv_to_test']:.3f}" if "class_tv_to_test" in s else ""))
    lines.append("  captions per image: " + ", ".join(f"{k}: {v:,}" for k, v in r["captions_per_image"].items()))
    if r["classes"]:
        lines.append(f"  classes ({len(r['classes'])}, from {r['label_source']}): "
                     + ", ".join(f"{c} {n}" for c, n in r["classes"].items()))
    else:
        lines.append(f"  classes: none ({r['labelled_images']:,} of {r['images']:,} images labelled; no classification task)")
    d = r["duplicate_captions"]
    lines.append(f"  duplicate captions: {d['within_image']:,} within an image, {d['across_images']:,} shared across images")
    lines.append("  image paths: " + ", ".join(f"{k} {v:,}" for k, v in r["resolution"].items() if v)
                 + f"   (under {', '.join(r['image_roots'])})")
    for key, title in (("missing", "missing images"), ("unreadable", "unreadable images")):
        n = r[f"{key}_images"]
        lines.append(f"  {title}: {n:,}" + ("" if n else "  ok"))
        for ex in r[f"{key}_examples"]:
            lines.append(f"    {ex['image']} -> {ex['path']}" + ("" if key == "missing" else f" ({ex['reason']})"))
        if n > len(r[f"{key}_examples"]):
            lines.append(f"    ... and {n - len(r[f'{key}_examples']):,} more")
    if r["problems"]:
        lines.append(f"  bad annotation entries: {r['problems']:,}")
        lines.extend(f"    {p}" for p in r["problem_examples"])
        if r["problems"] > len(r["problem_examples"]):
            lines.append(f"    ... and {r['problems'] - len(r['problem_examples']):,} more")
    for n in r["notes"]:
        lines.append(f"  note: {n}")
    lines.append("  status: " + ("OK" if exit_code(r) == 0 else "PROBLEMS FOUND (exit 1)"))
    return "\n".join(lines)
