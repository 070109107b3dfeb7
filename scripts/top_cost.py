"""Per-step cost of the two-tower's trained tops for several ``model.mode`` values (``top:I,T``).

What a training step of a top mode pays on top of the cached trunk activations: the forward and
backward of the trained image blocks + head and of the trained MiniLM layers + head, for one batch,
on the thread count given. The modes are timed in interleaved rounds (so a load change hits every
mode alike) and the minimum over rounds is reported, as JSON and a markdown table.

    python scripts/top_cost.py --data ../shared/data/rsicd --modes top:1,1 top:1,3 top:1,6 top:2,1
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def measure(modes: list[str], texts: list[str], batch: int, rounds: int, threads: int) -> dict[str, dict[str, float]]:
    """``{mode: {"image": s, "text": s, "step": s, "image_trained": n, "text_trained": n}}``: min over
    ``rounds`` of forward + backward of each tower's trained top, and its trainable parameters."""
    import torch

    from rsitr.models.registry import build_backbone

    torch.set_num_threads(threads)
    bb = build_backbone("towers:efficientnet-lite0+minilm-l6", device="cpu")
    ids = bb.tokenize((texts * (batch // max(len(texts), 1) + 1))[:batch])
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 224, 224, generator=gen)
    cached, trained = {}, {}
    for m in modes:  # the activations the trunk cache would hold for this cut, and what the mode trains
        bb.apply_mode(m)
        bb.eval()
        with torch.no_grad():
            cached[m] = (bb.image_trunk(pixels), bb.text_trunk(ids))
        trained[m] = {what: sum(p.numel() for n, p in bb.named_parameters() if p.requires_grad and n.startswith(what))
                      for what in ("image", "text")}  # image_tower + image_proj, text_tower + text_proj
    times: dict[str, dict[str, list[float]]] = {m: {"image": [], "text": []} for m in modes}
    for _ in range(rounds):
        for m in modes:
            bb.apply_mode(m)
            bb.train()
            for what, feats, head in (("image", cached[m][0], bb.image_head), ("text", cached[m][1], bb.text_head)):
                t = time.perf_counter()
                head(feats).pooled.float().pow(2).sum().backward()
                times[m][what].append(time.perf_counter() - t)
            bb.zero_grad(set_to_none=True)
    out = {}
    for m in modes:
        # the step is the sum of the two rounded parts, so the three columns add up as printed
        img, txt = round(min(times[m]["image"]), 4), round(min(times[m]["text"]), 4)
        out[m] = {"image": img, "text": txt, "step": round(img + txt, 4),
                  "image_trained": trained[m]["image"], "text_trained": trained[m]["text"]}
    return out


def render(res: dict[str, dict[str, float]]) -> str:
    first = next(iter(res.values()))["step"]
    lines = ["| mode | image top s | text top s | step s | vs first row |", "|---|---:|---:|---:|---:|"]
    for m, r in res.items():
        lines.append(f"| `{m}` | {r['image']:.2f} | {r['text']:.2f} | {r['step']:.2f} | {r['step'] / first:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="caption dataset whose train captions are the text batch (default: a fixed sentence)")
    p.add_argument("--modes", nargs="+", default=["top:1,1", "top:1,2", "top:1,3", "top:1,6", "top:2,1"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = p.parse_args(argv)
    if a.batch < 1 or a.rounds < 1 or a.threads < 1:
        p.error("--batch, --rounds and --threads must be >= 1")
    texts = ["many buildings and green trees are around a playground"]
    if a.data:
        from rsitr.data.captions import load_dataset

        texts = load_dataset(a.data, check_images=False).split("train").texts()[0][: a.batch] or texts
    from rsitr.utils.errors import RsitrError

    try:
        res = measure(a.modes, texts, a.batch, a.rounds, a.threads)
    except RsitrError as exc:
        print(f"top_cost: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1) if a.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
