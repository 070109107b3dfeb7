"""Encoding throughput on this machine: images/s and texts/s of the reference eager
implementations, rsitr's torch modules and rsitr's ONNX Runtime engine, side by side in one run
on the same inputs (``rsitr bench encode``).

* images: real images when a folder is at hand (``--images DIR``, default the UCM-Captions images
  at ``$RSITR_UCM`` or ``../shared/data/ucm-captions``), decoded and transformed once, outside the
  timing; otherwise seeded random pixels (weights, not pixel values, decide the compute);
* texts: the captions of that dataset when it has a ``dataset*.json``, else a fixed sample;
* the reference implementations (two-tower only): ``efficientnet-lite-pytorch`` (the image trunk
  with the same ImageNet weights) and ``transformers``' ``BertModel`` (all-MiniLM-L6-v2); both are
  optional (``pip install efficientnet-lite-pytorch transformers``) and skipped when absent;
* each figure is the median over ``n_batches`` timed batches after one warm-up, the
  implementations timed in interleaved rounds (a change of machine load hits every row alike);
  tokenization is outside the text timing for every row, so the rows compare forward passes.

Named CLIP configs (``clip:ViT-B-32``) are measured with random weights: weights do not change
the compute.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAMPLE_CAPTIONS = [
    "many buildings and green trees are around a playground",
    "three white storage tanks are next to a road in an industrial area",
    "a river with a bridge passes through a dense residential area",
    "several planes are parked near the terminal of the airport",
]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def default_image_dir() -> Path | None:
    root = Path(os.environ.get("RSITR_UCM", "../shared/data/ucm-captions"))
    return root / "images" if (root / "images").is_dir() else None


def load_inputs(model, batch_size: int, images: str | os.PathLike | None) -> tuple[torch.Tensor, list[str], str]:
    """(pixels [B, 3, S, S] under the model's eval transform, B captions, what they are)."""
    from rsitr.data.images import load_image
    from rsitr.data.transforms import EvalTransform

    folder = Path(images) if images else default_image_dir()
    size = model.preprocess.image_size
    texts = [SAMPLE_CAPTIONS[i % len(SAMPLE_CAPTIONS)] for i in range(batch_size)]
    if folder is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, 3, size, size, generator=g), texts, "random pixels"
    if not folder.is_dir():
        from rsitr.utils.errors import RsitrError

        raise RsitrError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:batch_size]
    if not files:
        from rsitr.utils.errors import RsitrError

        raise RsitrError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    tf = EvalTransform(model.preprocess)
    pixels = torch.stack([tf(load_image(p)) for p in files])
    if len(files) < batch_size:  # a small folder: repeat its images up to the batch
        pixels = pixels.repeat((batch_size + len(files) - 1) // len(files), 1, 1, 1)[:batch_size]
    ann = sorted(folder.parent.glob("dataset*.json"))
    if ann:
        import json

        sents = [s["raw"] for im in json.loads(ann[0].read_text(encoding="utf-8")).get("images", []) for s in im.get("sentences", [])]
        if sents:
            texts = [sents[i % len(sents)] for i in range(batch_size)]
    return pixels, texts, f"{len(files)} images of {folder}"


def _interleaved_medians(fns: dict[str, object], n_batches: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (A B C A B C ...)
    after one warm-up call each, so that a change of machine load hits every row alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n_batches):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _reference_towers(model):
    """(image fn, text fn) of the reference eager implementations of a two-tower model, or Nones."""
    image_fn = text_fn = None
    name = model.info.config.get("image", "")
    try:
        import efficientnet_lite_pytorch as ref_pkg

        from rsitr.models.towers import image_weights_path

        ref = ref_pkg.EfficientNet.from_pretrained(name, weights_path=str(image_weights_path(name))).eval()
        image_fn = ref.extract_features
    except Exception as exc:  # noqa: BLE001 - the reference is optional
        log.warning("reference image tower unavailable (%s); pip install efficientnet-lite-pytorch", exc)
    try:
        import transformers

        from rsitr.models.towers import text_weights_dir

        transformers.logging.set_verbosity_error()
        bert = transformers.BertModel.from_pretrained(str(text_weights_dir()), add_pooling_layer=False).eval()

        def text_fn(ids):
            return bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state

    except Exception as exc:  # noqa: BLE001
        log.warning("reference text tower unavailable (%s); pip install transformers", exc)
    return image_fn, text_fn


@torch.no_grad()
def encode_comparison(source: str, *, batch_size: int = 64, n_batches: int = 5, images: str | None = None,
                      engines=("torch", "onnx"), reference: bool = True, progress: bool = True) -> list[dict]:
    """One row per implementation: images/s and texts/s on the same batch of ``batch_size``
    images and captions, with ratios to the reference (or to rsitr torch when no reference)."""
    from rsitr.methods.factory import load_model
    from rsitr.models.engine import engine_for
    from rsitr.models.towers import TwoTower
    from rsitr.models.towers.minilm import pad_trim

    model = load_model(source).eval()
    pixels, texts, what = load_inputs(model, batch_size, images)
    ids = model.tokenize(texts)
    split = model.capabilities.trunk_cache  # the engine runs the trunks (the heads stay in torch): time those
    base = {"backbone": source, "name": model.info.name, "params": sum(p.numel() for p in model.parameters()), "image_size": model.preprocess.image_size,
            "batch_size": batch_size, "inputs": what, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}
    impls: list[tuple[str, object, object]] = []  # (name, image fn, text fn)
    if reference and isinstance(model, TwoTower):  # the reference implementations are of its two towers
        image_fn, text_fn = _reference_towers(model)
        # the reference BERT gets the padding-trimmed ids, as rsitr's trunk runs them
        ref_ids = ids[:, : pad_trim(ids, model.pad_id)]
        impls.append(("reference eager (efficientnet-lite-pytorch + transformers BertModel)",
                      (lambda: image_fn(pixels)) if image_fn else None, (lambda: text_fn(ref_ids)) if text_fn else None))
    for kind in engines:
        eng = engine_for(model, kind)
        if kind == "onnx":
            eng.describe()  # export / load the graphs outside the timing
        img = (lambda eng=eng: eng.image_trunk(pixels)) if split else (lambda eng=eng: eng.encode_image(pixels))
        txt = (lambda eng=eng: eng.text_trunk(ids)) if split else (lambda eng=eng: eng.encode_text(ids))
        impls.append((f"rsitr {eng.kind}" + ("" if eng.kind == kind else f" (asked {kind})"), img, txt))
    t_img = _interleaved_medians({name: f for name, f, _ in impls if f is not None}, n_batches)
    t_txt = _interleaved_medians({name: f for name, _, f in impls if f is not None}, n_batches)
    rows = [{**base, "impl": name, "image_s": t_img.get(name), "text_s": t_txt.get(name)} for name, _, _ in impls]
    ref_img = next((r["image_s"] for r in rows if r["image_s"]), None)
    ref_txt = next((r["text_s"] for r in rows if r["text_s"]), None)
    for r in rows:
        r["images_per_s"] = round(batch_size / r["image_s"], 1) if r["image_s"] else None
        r["texts_per_s"] = round(batch_size / r["text_s"], 1) if r["text_s"] else None
        r["image_speedup"] = round(ref_img / r["image_s"], 2) if r["image_s"] and ref_img else None
        r["text_speedup"] = round(ref_txt / r["text_s"], 2) if r["text_s"] and ref_txt else None
        r["what"] = "trunks (pooled + tokens)" if split else "pooled embeddings"
    return rows


def render(rows: list[dict]) -> str:
    head = ("| backbone | implementation | what | batch | images/s | x first row | texts/s | x first row | threads | inputs |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    fmt = lambda v: "-" if v is None else f"{v}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['impl']} | {r['what']} | {r['batch_size']} | {fmt(r['images_per_s'])} | {fmt(r['image_speedup'])} | "
                     f"{fmt(r['texts_per_s'])} | {fmt(r['text_speedup'])} | {r['threads']} | {r['inputs']} |")
    return "\n".join(lines)


# -- the measurement ---------------------------------------------------------------------------------
def encode(backbones, **kw) -> dict:
    """:func:`encode_comparison` of every backbone as a measurement result: ``{"rows"}``."""
    return {"rows": [r for b in backbones for r in encode_comparison(b, **kw)]}


def _encode_on_cell(ctx, params: dict) -> dict:
    """``encode`` on the cell's checkpoint (``params``: the options of :func:`encode_comparison`;
    the reference implementations are left out unless ``reference: true``)."""
    return encode([ctx.source], **{"reference": False, "progress": False, **params})


def _render_encode(result: dict) -> str:
    return render(result["rows"])


def _register() -> None:
    from rsitr.bench.measurements import Measurement, keyword_check, per_method, register_measurement

    register_measurement(Measurement("encode", "Encoding throughput", per_method(_render_encode), on_cell=_encode_on_cell, run=encode,
                                     render_one=_render_encode, check=keyword_check("encode", encode_comparison, exclude=("source", "progress"))))


_register()
