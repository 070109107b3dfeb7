"""`rsitr search` ranks as `rsitr eval` does, for every method: the engine asks the checkpoint's
method how to score a text query against the recalled images (``rerank="auto"``, the default) --
the recall cosine (baseline, RDB), FTF's two-stage rerank, iEBAKER's local mix -- and says once
what it cannot apply (SAR in a combo), never ranking differently in silence."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

pytest.importorskip("faiss")

SPLIT = "train"  # the largest split of the tiny synthetic set: the index holds exactly its images

METHODS = {
    "baseline": ({}, None),
    "rdb": ({}, None),
    "ftf": ({"alpha": 0.2, "tau": 0.03, "balance": 0.8, "k": 4}, None),
    "iebaker": ({"local": True, "local_eval_weight": 0.4}, None),
    # FTF scores, iEBAKER's SAR re-ranks at eval: search applies FTF's scoring and warns that SAR is not applied
    "combo": ({"parts": {"ftf": {"k": 4, "alpha": 0.3}, "iebaker": {"sar": True}}}, "SAR re-ranking is not applied"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rsitr.data.synth import write_synth

    root = tmp_path_factory.mktemp("search_like_eval")
    return write_synth(root / "synth", n_images=24, seed=2, image_size=32)


def _train(ann, out, name: str, options: dict) -> None:
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    train(TrainConfig().override({
        "data.path": str(ann), "out_dir": str(out), "model.backbone": "clip:tiny", "model.mode": "full", "epochs": 1, "max_steps": 2,
        "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 64, "seed": 3, "augment.enabled": False,
        "method.name": name, "method.options": options, "inference.engine": "torch",
    }), progress=False, evaluate_test=False)


def _fp16_tokens(enc):
    """``enc`` with the image tokens as the index's token store keeps them (unit vectors in fp16)."""
    from rsitr.eval.evaluate import Encoded
    from rsitr.models.base import Features

    f = enc.image_features
    toks = torch.nn.functional.normalize(f.tokens.float(), dim=-1).masked_fill(~f.mask.bool()[..., None], 0.0).half().float()
    return Encoded(enc.images, enc.texts, enc.text_to_image, Features(f.pooled, toks, f.mask), enc.text_features)


def _t2i(sim):
    """The text->image matrix of a method's scoring (a ``(t2i, i2t)`` pair or one matrix for both)."""
    return sim[0] if isinstance(sim, tuple) else sim


@pytest.mark.parametrize("name", list(METHODS))
def test_search_ranks_like_eval(name, data, tmp_path, caplog):
    from rsitr.cli import main
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset, similarity
    from rsitr.methods.factory import load
    from rsitr.retrieval.twostage import OFFSET
    from rsitr.search.engine import SearchEngine

    options, warning = METHODS[name]
    run = tmp_path / "run"
    _train(data, run, name, options)
    loaded = load(str(run))
    split = load_dataset(str(data)).split(SPLIT)
    n = len(split)
    # what `rsitr eval` ranks texts->images by (the first matrix of the method's pair)
    t2i = _t2i(similarity(loaded.backbone, split, method=loaded.method, per_direction=True, progress=False)[0])
    method = loaded.method
    if name == "combo":  # the part search cannot apply (and warns about): eval without it is what search must equal
        method.parts["iebaker"].opts.sar = False
        t2i = _t2i(similarity(loaded.backbone, split, method=method, per_direction=True, progress=False)[0])
    plan = method.candidate_scoring()
    # the same scoring on tokens rounded as the index stores them (fp16): search must equal it within 1e-4
    ref = t2i
    if plan.needs_tokens:
        enc = encode_dataset(loaded.backbone, split, keep_tokens=True, progress=False)
        ref = _t2i(method.similarity_pair(loaded.backbone, _fp16_tokens(enc)))
        assert torch.allclose(ref, t2i, atol=5e-3)  # ... and that is eval's matrix up to the storage precision

    src = tmp_path / "tiles"
    src.mkdir()
    for i, e in enumerate(split.entries):
        shutil.copy(e.path, src / f"{i:03d}.png")
    index = tmp_path / "index"
    assert main(["-q", "index", "build", str(src), "--checkpoint", str(run), "--out", str(index), "--keep-tokens", "--batch-size", "8",
                 "--engine", "torch"]) == 0
    eng = SearchEngine(index, engine="torch")
    try:
        texts, _ = split.texts()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rsitr.search.engine"):
            for j in range(0, len(texts), max(1, len(texts) // 8)):
                got = eng.search(texts[j], k=n, rerank_depth=n)  # rerank="auto": the default
                ids = [int(r["path"].rsplit("/", 1)[-1][:3]) for r in got]
                scores = torch.tensor([r["score"] for r in got])
                want = torch.sort(ref[:, j], descending=True, stable=True)
                assert ids == want.indices.tolist(), (name, j)
                # eval's two-stage matrix keeps the non-candidates at coarse - OFFSET: search shows their cosine
                w = want.values.float()
                w = torch.where(w < -OFFSET / 2, w + OFFSET, w)
                assert torch.allclose(scores, w, atol=1e-4), (name, j, (scores - w).abs().max())
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if warning is None:
            assert not said, said
        else:
            assert len(said) == 1 and warning in said[0], said  # said once, for every query of the engine
    finally:
        eng.close()
