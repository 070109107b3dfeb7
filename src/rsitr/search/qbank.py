"""The query bank of an index: QB-Norm for free-text search (``rsitr index qbank``, ``rsitr search
--rerank qbnorm``).

QB-Norm (:mod:`rsitr.retrieval.qbnorm`) divides each tile's score by how close the tile is to a
bank of captions that are not the query -- typically the training captions of the index's model.
The bank's embeddings (the index's model, fp16) are stored beside the index in ``qbank.npy``
with ``qbank.json`` (source, split, count, ``beta``, the model's weight hash). They do not depend
on the indexed items, so ``rsitr index add`` leaves them valid. A search recalls ``depth`` tiles
by the plain cosine and re-ranks them by ``cosine - z``, ``z`` the tile's normaliser over the
bank (computed for the candidates only: ``depth x bank`` dot products per query).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.utils.errors import RsitrError

BANK = "qbank.npy"
META = "qbank.json"
DEFAULT_BETA = 14.0  # chosen on RSICD val for every method (rsitr bench fuse; README "Fusion and QB-Norm")


def build_query_bank(index_dir: str | Path, captions: str | Path, *, split: str = "train", beta: float = DEFAULT_BETA,
                     batch_size: int = 256, engine: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Encode the captions of ``split`` of the caption dataset ``captions`` with the index's model
    and store them as the index's query bank (replacing any earlier one)."""
    from rsitr.data.captions import load_dataset
    from rsitr.models.engine import encode_texts, engine_for
    from rsitr.search.manifest import IndexManifest, load_model, model_identity
    from rsitr.utils.io import atomic_path, atomic_write_json

    index_dir = Path(index_dir)
    if not beta > 0:
        raise RsitrError(f"--beta must be > 0, got {beta}")
    manifest = IndexManifest.load(index_dir)
    data = load_dataset(captions, check_images=False)  # only the captions are encoded: the images need not be here
    part = data.split(split) if split != "all" else data
    texts, _ = part.texts()
    if not texts:
        raise RsitrError(f"{captions}: split '{split}' has no captions (splits present: {data.splits}); pass --split")
    spec = manifest.model.checkpoint
    model = load_model(spec)
    manifest.check_model(model_identity(spec, model), index_dir)
    model.eval()
    bank = encode_texts(model.backbone, texts, engine_for(model.backbone, engine), batch_size=batch_size, progress=progress,
                        desc="encode bank").numpy().astype(np.float16)
    with atomic_path(index_dir / BANK) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, bank)
    meta = {"source": str(captions), "split": split, "count": int(bank.shape[0]), "dim": int(bank.shape[1]), "beta": float(beta),
            "state_sha256": manifest.model.state_sha256}
    atomic_write_json(index_dir / META, meta)
    return meta


def load_query_bank(index_dir: Path, manifest) -> tuple[torch.Tensor, dict] | None:
    """The index's bank (``[B, D]`` float32) and its metadata (``manifest``: the index's
    :class:`~rsitr.search.manifest.IndexManifest`); None when it has none. A bank made
    with another model than the index's is refused."""
    meta_p, bank_p = index_dir / META, index_dir / BANK
    if not meta_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text())
        bank = np.load(bank_p)
    except (OSError, ValueError) as exc:
        raise RsitrError(f"{index_dir}: its query bank is unreadable ({exc}); make it again with `rsitr index qbank`") from exc
    if meta.get("state_sha256") != manifest.model.state_sha256:
        raise RsitrError(f"{index_dir}: its query bank was encoded by another model than the index's; make it again with `rsitr index qbank`")
    if bank.ndim != 2 or bank.shape != (meta.get("count"), manifest.embed_dim):
        raise RsitrError(f"{index_dir}: its query bank has shape {bank.shape}, expected ({meta.get('count')}, {manifest.embed_dim}); make it again")
    return torch.from_numpy(bank.astype(np.float32)), meta
