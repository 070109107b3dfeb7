"""How close is each val / test image to the training set? For every image of the two splits, the
cosine of its trained-model embedding to its nearest training image (the frozen trunk part read
from the run's trunk cache, the trained top and head applied here).

    python scripts/nearest_train.py RUN_DIR DATASET CACHE_DIR [--views-seed 0]

Prints mean and median, and the share above 0.95 / 0.98 / 0.99, for val and test."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    from rsitr.data.captions import load_dataset
    from rsitr.data.imagesets import build_trunk_cache, make_transforms
    from rsitr.methods.factory import load
    from rsitr.models.base import Features
    from rsitr.train.config import AugmentConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder (or checkpoint) of a two-tower model")
    ap.add_argument("data", help="caption dataset with train/val/test splits")
    ap.add_argument("cache", help="the trunk-cache folder the run used (cache_dir)")
    args = ap.parse_args()
    model = load(args.run).backbone.eval()
    model.requires_grad_(False)  # frozen: build_trunk_cache reads the cached cut activations
    data = load_dataset(args.data)
    eval_tf, _ = make_transforms(model, AugmentConfig())
    emb = {}
    for split in ("train", "val", "test"):
        cache = build_trunk_cache(model, data.split(split), cache_dir=Path(args.cache), views=1, eval_transform=eval_tf,
                                  keep_tokens=False, progress=False, batch_size=128)
        f = cache.image[0]
        with torch.no_grad():
            out = [model.image_head(Features(f.pooled[i : i + 256], f.tokens[i : i + 256].float(), f.mask[i : i + 256])).pooled
                   for i in range(0, f.pooled.shape[0], 256)]
        emb[split] = torch.nn.functional.normalize(torch.cat(out), dim=-1)
    for split in ("val", "test"):
        best = (emb[split] @ emb["train"].t()).max(1).values.numpy()
        share = ", ".join(f">{t}: {(best > t).mean() * 100:.1f}%" for t in (0.95, 0.98, 0.99))
        print(f"{split}: {len(best)} images, nearest-train cosine mean {best.mean():.3f}, median {np.median(best):.3f}; {share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
