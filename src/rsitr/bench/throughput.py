"""Encoding throughput of a backbone on this machine (images/s, texts/s).

Weights do not change the compute, so named CLIP configs (``clip:ViT-B-32``) are measured
with random weights when no checkpoint is at hand.
"""
from __future__ import annotations

import platform
import time

import torch

SAMPLE_CAPTIONS = [
    "many buildings and green trees are around a playground",
    "three white storage tanks are next to a road in an industrial area",
    "a river with a bridge passes through a dense residential area",
    "several planes are parked near the terminal of the airport",
]


@torch.no_grad()
def encode_throughput(source: str, *, batch_size: int = 64, n_batches: int = 5, device: str = "cpu", threads: int | None = None) -> dict:
    from rsitr.models.registry import load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(source, device=device).eval()
    size = model.preprocess.image_size
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    texts = [SAMPLE_CAPTIONS[i % len(SAMPLE_CAPTIONS)] for i in range(batch_size)]
    ids = model.tokenize(texts).to(device)

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_batches):
            fn()
        return (time.perf_counter() - t0) / n_batches

    t_img = timed(lambda: model.encode_image(pixels))
    t_txt = timed(lambda: model.encode_text(ids))
    t_tok = timed(lambda: model.tokenize(texts))
    return {
        "backbone": source,
        "name": model.info.name,
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": size,
        "batch_size": batch_size,
        "images_per_s": round(batch_size / t_img, 1),
        "texts_per_s": round(batch_size / t_txt, 1),
        "tokenize_texts_per_s": round(batch_size / t_tok, 1),
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def render(rows: list[dict]) -> str:
    head = "| backbone | params | image size | batch | images/s | texts/s | threads |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['params'] / 1e6:.1f}M | {r['image_size']} | {r['batch_size']} | {r['images_per_s']} | {r['texts_per_s']} | {r['threads']} |")
    return "\n".join(lines)
