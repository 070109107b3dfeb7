"""Test-time dihedral augmentation and QB-Norm in `rsitr eval` (issues 27/28).

TTA: a tile's embedding averaged over the 8 symmetries of the square is the same whichever of
those symmetries the tile arrives in (the orbit is the same set), and with 4 views whichever
rotation. QB-Norm: the eval path equals the retrieval primitives applied by hand."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rsitr.data.captions import load_dataset
from rsitr.data.transforms import dihedral_views
from rsitr.eval.evaluate import QBNormBank, encode_dataset, evaluate_ties, qbnorm_similarity, pair_metrics
from rsitr.retrieval.qbnorm import bank_normalizers, qb_norm


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = dihedral_views(x, 8)
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8
    assert len(dihedral_views(x, 4)) == 4 and dihedral_views(x, 1)[0] is x
    # closed under the group: every symmetry of every view is again a view
    orbit = {v.numpy().tobytes() for v in views}
    for v in views:
        assert {w.numpy().tobytes() for w in dihedral_views(v, 8)} == orbit
    with pytest.raises(ValueError, match="one of"):
        dihedral_views(x, 3)
    with pytest.raises(ValueError, match="square"):
        dihedral_views(x[..., :4], 4)


@pytest.fixture(scope="module")
def tiny():
    from rsitr.search.build import load_model

    return load_model("clip:tiny").backbone


def _rotated_copy(ann, tmp_path, op):
    """The dataset with every image replaced by ``op`` of it (same captions, same ids)."""
    src = ann.parent
    dst = tmp_path / f"rot{op}"
    shutil.copytree(src, dst)
    for p in (dst / "images").iterdir():
        with Image.open(p) as im:
            im.load()
            im.transpose(op).save(p)
    return dst / ann.name


@pytest.mark.parametrize("n,op,same", [(8, Image.Transpose.ROTATE_90, True), (8, Image.Transpose.FLIP_LEFT_RIGHT, True),
                                       (4, Image.Transpose.ROTATE_270, True), (4, Image.Transpose.FLIP_TOP_BOTTOM, False),
                                       (1, Image.Transpose.ROTATE_90, False)])
def test_tta_embedding_is_invariant_to_its_views(tiny, synth_dataset, tmp_path, n, op, same):
    ann = synth_dataset(n_images=12, image_size=64)
    a = load_dataset(ann).split("test")
    b = load_dataset(_rotated_copy(ann, tmp_path, op)).split("test")
    ea = encode_dataset(tiny, a, progress=False, tta=n).images
    eb = encode_dataset(tiny, b, progress=False, tta=n).images
    assert (torch.allclose(ea, eb, atol=1e-5)) is same


def test_qbnorm_eval_equals_the_primitives(tiny, synth_dataset):
    data = load_dataset(synth_dataset(n_images=30, image_size=64))
    test, bank = data.split("test"), data.split("train")
    got, owner = qbnorm_similarity(tiny, test, QBNormBank(bank, beta=10.0), progress=False, tta=4)
    e = encode_dataset(tiny, test, progress=False, tta=4)
    b = encode_dataset(tiny, bank, progress=False, tta=1)  # bank images are queries: one view
    want = qb_norm(e.images @ e.texts.t(), bank_normalizers(e.images, b.texts, 10.0), bank_normalizers(e.texts, b.images, 10.0))
    assert owner == e.text_to_image
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    m = evaluate_ties(tiny, test, rerank="qbnorm", rerank_options={"qbnorm": QBNormBank(bank, beta=10.0)}, progress=False, tta=4)
    assert m["expected"]["mR"] == pytest.approx(pair_metrics(want, owner)["mR"])


def test_cli_eval_tta_and_qbnorm(synth_dataset, capsys):
    from rsitr.cli import main

    ann = synth_dataset(n_images=30, image_size=64)
    rc = main(["-q", "eval", "--data", str(ann), "--checkpoint", "clip:tiny", "--tta", "8", "--rerank", "qbnorm", "--json",
               "--engine", "torch"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["tta"] == 8 and out["rerank"] == "qbnorm" and out["qbnorm_bank"] == "train" and 0 <= out["mR"] <= 100
    with pytest.raises(SystemExit):
        main(["-q", "eval", "--data", str(ann), "--checkpoint", "clip:tiny", "--tta", "3"])
    rc = main(["-q", "eval", "--data", str(ann), "--checkpoint", "clip:tiny", "--rerank", "qbnorm", "--qbnorm-bank", "test"])
    assert rc != 0 and "bank" in capsys.readouterr().err
