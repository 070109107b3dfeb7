"""`method.false_negatives: mask`: a caption shared by several batch images is no negative of them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rsitr.data.types import CaptionDataset, ImageEntry
from rsitr.losses.contrastive import drop_false_negatives, info_nce
from rsitr.methods.iebaker import masked_info_nce
from rsitr.methods.base import Method
from rsitr.utils.errors import RsitrError


def _ds() -> CaptionDataset:
    caps = [
        ["There is a piece of farmland.", "green fields"],
        ["there is a  piece of farmland.", "a river"],  # the same sentence, case and spacing aside
        ["a road", "cars on a road"],
    ]
    return CaptionDataset([ImageEntry(f"{i}.tif", Path(f"{i}.tif"), "train", c) for i, c in enumerate(caps)])


def test_same_text_marks_shared_sentences():
    m = Method.__new__(Method)
    torch.nn.Module.__init__(m)
    assert Method.same_text(m, {"text_index": torch.tensor([0]), "image_index": torch.tensor([0])}) is None
    m.mask_false_negatives(_ds())
    # batch: (image 0, caption 0 "farmland"), (image 1, caption 3 "a river"), (image 2, caption 4),
    # (image 1, caption 2 "farmland" again)
    batch = {"image_index": torch.tensor([0, 1, 2, 1]), "text_index": torch.tensor([0, 3, 4, 2])}
    same = m.same_text(batch)
    want = torch.tensor([
        [1, 0, 0, 1],  # image 0 also has the sentence of text 3 (caption 2)
        [1, 1, 0, 1],  # image 1 has "farmland" (texts 0 and 3) and "a river"
        [0, 0, 1, 0],
        [1, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(same, want)


def test_info_nce_with_the_mask_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    same = torch.eye(4, dtype=torch.bool)
    same[0, 2] = same[3, 1] = True
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    i2t = [-(logits[i, i] - torch.logsumexp(torch.stack([logits[i, j] for j in range(4) if j == i or not same[i, j]]), 0)) for i in range(4)]
    t2i = [-(logits[j, j] - torch.logsumexp(torch.stack([logits[i, j] for i in range(4) if i == j or not same[i, j]]), 0)) for j in range(4)]
    want = 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())
    assert info_nce(img, txt, scale, same=same) == pytest.approx(float(want), rel=1e-5)
    assert masked_info_nce(img, txt, scale, None, same=same) == pytest.approx(float(want), rel=1e-5)
    # only the diagonal: the plain loss; a masked pair gets no gradient
    assert info_nce(img, txt, scale, same=torch.eye(4, dtype=torch.bool)) == pytest.approx(float(info_nce(img, txt, scale)))
    raw = logits.clone().requires_grad_(True)
    out = drop_false_negatives(raw, same)
    (F.cross_entropy(out, torch.arange(4)) + F.cross_entropy(out.t(), torch.arange(4))).backward()
    assert raw.grad[0, 2] == 0 and raw.grad[3, 1] == 0 and raw.grad[0, 1] != 0
    with pytest.raises(ValueError, match="does not match"):
        drop_false_negatives(logits, same[:3])


def test_training_with_the_mask(tmp_path):
    from rsitr.data.synth import write_synth
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    write_synth(tmp_path / "d", n_images=40, seed=2, image_size=64)
    over = {"data.path": str(tmp_path / "d" / "dataset_synth.json"), "model.backbone": "clip:tiny", "model.mode": "full",
            "epochs": 1, "max_steps": 2, "batch_size": 16, "eval_every": 0, "seed": 1}
    for name in ("baseline", "iebaker", "ftf", "combo"):
        opts = {"parts": {"iebaker": {}, "ftf": {}}} if name == "combo" else {}
        cfg = TrainConfig().override({**over, "out_dir": str(tmp_path / name), "method.name": name, "method.options": opts,
                                      "method.false_negatives": "mask"})
        res = train(cfg, progress=False, evaluate_test=False)
        assert res.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    cfg = TrainConfig().override({**over, "out_dir": str(tmp_path / "bad"), "method.false_negatives": "drop"})
    with pytest.raises(RsitrError, match="false_negatives"):
        train(cfg, progress=False, evaluate_test=False)


# -- method.positives: multi ----------------------------------------------------------------------
def test_multi_positive_targets_equal_the_hand_computation():
    from rsitr.losses.contrastive import multi_positive_ce

    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    same = torch.eye(4, dtype=torch.bool)
    same[0, 2] = same[3, 1] = same[1, 1] = True
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    lp_row, lp_col = F.log_softmax(logits, 1), F.log_softmax(logits, 0)
    # image i: mean of -log p(text j | i) over its positives j; text j: over the images i it describes
    i2t = [-torch.stack([lp_row[i, j] for j in range(4) if same[i, j]]).mean() for i in range(4)]
    t2i = [-torch.stack([lp_col[i, j] for i in range(4) if same[i, j]]).mean() for j in range(4)]
    want = 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())
    assert info_nce(img, txt, scale, same=same, positives="multi") == pytest.approx(float(want), rel=1e-5)
    assert masked_info_nce(img, txt, scale, None, same=same, positives="multi") == pytest.approx(float(want), rel=1e-5)
    # it differs from masking, and without shared sentences it is the plain loss
    assert abs(float(info_nce(img, txt, scale, same=same)) - float(want)) > 1e-3
    eye = torch.eye(4, dtype=torch.bool)
    assert info_nce(img, txt, scale, same=eye, positives="multi") == pytest.approx(float(info_nce(img, txt, scale)), rel=1e-6)
    # a shared-sentence pair is pulled together (masking would give it no gradient at all)
    raw = logits.clone().requires_grad_(True)
    multi_positive_ce(raw, same).backward()
    assert raw.grad[0, 2] < 0 and raw.grad[3, 1] < 0 and raw.grad[0, 1] > 0
    # EBA's kept rows: only those act as queries
    keep = torch.tensor([True, False, True, True])
    i2t_k = torch.stack([i2t[i] for i in (0, 2, 3)]).mean()
    t2i_k = torch.stack([t2i[j] for j in (0, 2, 3)]).mean()
    got = masked_info_nce(img, txt, scale, keep, same=same, positives="multi")
    assert got == pytest.approx(float(0.5 * (i2t_k + t2i_k)), rel=1e-5)
    with pytest.raises(ValueError, match="positives"):
        info_nce(img, txt, scale, same=same, positives="many")


def test_training_with_multi_positives(tmp_path, monkeypatch):
    from rsitr.data.synth import write_synth
    from rsitr.methods.combo import Combo
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    write_synth(tmp_path / "d", n_images=40, seed=2, image_size=64)
    over = {"data.path": str(tmp_path / "d" / "dataset_synth.json"), "model.backbone": "clip:tiny", "model.mode": "full",
            "epochs": 1, "max_steps": 2, "batch_size": 16, "eval_every": 0, "seed": 1, "method.positives": "multi"}
    seen = []
    real = Combo.loss

    def spy(self, *a, **k):
        seen.append({n: (p.positives, p._fn_text is not None) for n, p in self.parts.items()})
        return real(self, *a, **k)

    monkeypatch.setattr(Combo, "loss", spy)
    for name in ("baseline", "combo"):
        opts = {"parts": {"iebaker": {}, "ftf": {}}} if name == "combo" else {}
        cfg = TrainConfig().override({**over, "out_dir": str(tmp_path / name), "method.name": name, "method.options": opts})
        res = train(cfg, progress=False, evaluate_test=False)
        assert res.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    # the combination hands the choice and the sentence table to its parts
    assert seen and all(v == ("multi", True) for s in seen for v in s.values())
    cfg = TrainConfig().override({**over, "out_dir": str(tmp_path / "bad"), "method.positives": "all"})
    with pytest.raises(RsitrError, match="method.positives"):
        train(cfg, progress=False, evaluate_test=False)
