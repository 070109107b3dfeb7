"""Writing the synthetic benchmark to disk: the plan (names, classes, splits), the noisy captions,
the images, ``labels.csv`` and the Karpathy JSON (see :mod:`rsitr.data.synth` for the layout and
the determinism and atomicity guarantees)."""
from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from rsitr.data.synth.builders import make_scene
from rsitr.data.synth.language import CAPTIONS_PER_IMAGE, GENERIC_NOISE, Caption, tokens_of
from rsitr.data.synth.rendering import render
from rsitr.data.synth.scene import CLASSES, Scene
from rsitr.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MAX_NOISY_PER_IMAGE = CAPTIONS_PER_IMAGE - 1


def image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), 0x5717])


def generate(index: int, cls: str, seed: int, size: int) -> tuple[Scene, list[Caption], Image.Image]:
    """Scene, captions and tile of image ``index`` (what :func:`write_synth` writes for it)."""
    rng = image_rng(seed, index)
    scene, caps = make_scene(cls, rng)
    return scene, caps, render(scene, size, rng)


def plan(n_images: int, seed: int, splits: tuple[float, float, float]) -> list[tuple[str, str, str]]:
    """(filename, class, split) per image: classes in turn, splits by a seeded permutation."""
    if n_images < 3:
        raise ValueError(f"n_images must be at least 3 (one per split), got {n_images}")
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {splits}")
    tot = float(sum(splits))
    n_val = max(1, int(round(n_images * splits[1] / tot)))
    n_test = max(1, int(round(n_images * splits[2] / tot)))
    n_train = n_images - n_val - n_test
    if n_train < 1:
        raise ValueError(f"n_images={n_images} is too small for splits {splits}")
    counter: dict[str, int] = {}
    rows = []
    for i in range(n_images):
        cls = CLASSES[i % len(CLASSES)]
        counter[cls] = counter.get(cls, 0) + 1
        rows.append([f"{cls}_{counter[cls]}.png", cls, ""])
    perm = np.random.default_rng([int(seed), 0x5B17]).permutation(n_images)
    for rank, i in enumerate(perm.tolist()):
        rows[i][2] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return [tuple(r) for r in rows]  # type: ignore[misc]


def assign_noise(captions: list[list[str]], classes: list[str], splits: list[str], noise_frac: float, seed: int) -> list[list[bool]]:
    """Replace ``round(noise_frac * train captions)`` train captions in place; return the flags.

    A replacement is a caption of a random image of another class (2/3) or an unrelated sentence
    (1/3). At most :data:`MAX_NOISY_PER_IMAGE` per image, so the cap is 4/5 of the train captions."""
    flags = [[False] * len(c) for c in captions]
    if noise_frac <= 0:
        return flags
    if noise_frac > 1:
        raise ValueError(f"noise_frac must be in [0, 1], got {noise_frac}")
    rng = np.random.default_rng([int(seed), 0x0150])
    train = [i for i, s in enumerate(splits) if s == "train"]
    slots = [(i, k) for i in train for k in range(len(captions[i]))]
    want = int(round(noise_frac * len(slots)))
    cap = sum(min(MAX_NOISY_PER_IMAGE, len(captions[i])) for i in train)
    if want > cap:
        log.warning("noise_frac=%.3f asks for %d noisy captions; at most %d (4 per image) are replaced", noise_frac, want, cap)
        want = cap
    originals = [list(c) for c in captions]
    per_image: dict[int, int] = {}
    done = 0
    for j in rng.permutation(len(slots)).tolist():
        if done >= want:
            break
        i, k = slots[j]
        if per_image.get(i, 0) >= MAX_NOISY_PER_IMAGE:
            continue
        if rng.random() < 2 / 3:
            while True:
                other = int(rng.integers(len(captions)))
                if classes[other] != classes[i]:
                    break
            text = originals[other][int(rng.integers(len(originals[other])))]
        else:
            text = GENERIC_NOISE[int(rng.integers(len(GENERIC_NOISE)))]
        captions[i][k] = text
        flags[i][k] = True
        per_image[i] = per_image.get(i, 0) + 1
        done += 1
    return flags


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def write_synth(
    out_dir: str | os.PathLike,
    n_images: int = 600,
    seed: int = 0,
    noise_frac: float = 0.0,
    image_size: int = 128,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Write the synthetic benchmark to ``out_dir`` and return the path of its JSON annotation
    (``out_dir/dataset_synth.json``). See the module docstring for layout and guarantees."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if not 0.0 <= noise_frac <= 1.0:
        raise ValueError(f"noise_frac must be in [0, 1], got {noise_frac}")
    t0 = time.perf_counter()
    from rsitr.utils.io import make_output_dir

    out = make_output_dir(out_dir)
    ann = out / "dataset_synth.json"
    if ann.exists():  # the old annotation must not outlive the images it describes
        ann.unlink()
    rows = plan(n_images, seed, tuple(splits))  # type: ignore[arg-type]
    tmp = out / f".images.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    def job(i: int) -> list[str]:
        name, cls, _ = rows[i]
        _, caps, img = generate(i, cls, seed, image_size)
        (tmp / name).write_bytes(_png_bytes(img))
        return [c.text for c in caps]

    n_workers = workers if workers and workers > 0 else min(8, os.cpu_count() or 1)
    try:
        from rsitr.utils.progress import progress_bar

        bar = progress_bar(total=n_images, desc="synth images", unit="img", disable=not progress, leave=False)
        if n_workers == 1 or n_images < 32:
            captions = []
            for i in range(n_images):
                captions.append(job(i))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                captions = []
                for c in pool.map(job, range(n_images)):
                    captions.append(c)
                    bar.update()
        bar.close()
        images_dir = out / "images"
        old = out / f".images.old-{os.getpid()}"
        if images_dir.exists():
            os.replace(images_dir, old)
        os.replace(tmp, images_dir)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    classes = [r[1] for r in rows]
    split_of = [r[2] for r in rows]
    flags = assign_noise(captions, classes, split_of, noise_frac, seed)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["filename", "class"])
    for name, cls, _ in rows:
        w.writerow([name, cls])
    atomic_write_text(out / "labels.csv", buf.getvalue())
    images = []
    sid = 0
    for i, (name, cls, split) in enumerate(rows):
        sents = []
        for text, noisy in zip(captions[i], flags[i]):
            sents.append({"raw": text, "tokens": tokens_of(text), "imgid": i, "sentid": sid, "noisy": noisy})
            sid += 1
        images.append({"filename": name, "imgid": i, "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents})
    atomic_write_json(ann, {"dataset": "synth", "images": images})
    log.info("synthetic benchmark: %d images (%d classes), %d captions (%d noisy) in %s (%.1fs)", n_images,
             len(set(classes)), sid, sum(map(sum, flags)), out, time.perf_counter() - t0)
    return ann


def bench_dataset(out_dir: str | os.PathLike, n_images: int, noise_frac: float = 0.0, progress: bool = True) -> Path:
    """The synthetic benchmark a bench command uses when given no ``--data``: written once to
    ``out_dir/data`` (seed 0) and reused by later runs; returns its annotation path."""
    ann = Path(out_dir) / "data" / "dataset_synth.json"
    if ann.is_file():
        return ann
    print(f"generating a synthetic benchmark ({n_images} images" + (f", noise {noise_frac}" if noise_frac else "") + ") ...", flush=True)
    return write_synth(ann.parent, n_images=n_images, seed=0, noise_frac=noise_frac, progress=progress)
