"""iEBAKER: EBA's filter, KER's keyword swaps, SAR's re-ranking, and the method in the loop."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from rsitr.methods.iebaker import IEBAKER, eliminate, local_similarity, masked_info_nce
from rsitr.methods.keywords import KeywordIndex, build_vocab, category_of, load_vocab, swap_keyword, words
from rsitr.retrieval.rerank import sar, sar_order, top_lists
from rsitr.utils.errors import DataError, RsitrError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOCAB_FILE = SHARED / "data" / "captions" / "rsitmd_tag_vocab_512.txt"


def _desc(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.sort(x, dim=dim, descending=True, stable=True).indices


# -- EBA: the filter -----------------------------------------------------------------------------
def test_eba_global_fraction_removes_exactly_the_lowest_pairs():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4, 0.05])
    owner = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    drop, restored = eliminate(scores, owner, "global_fraction", fraction=0.3, min_keep=0)
    assert set(np.flatnonzero(drop)) == {9, 1, 5}  # the three lowest of ten
    assert not restored.any()
    # image 3 has a single caption: the guard keeps it, and nothing else changes
    drop, restored = eliminate(scores, owner, "global_fraction", fraction=0.3, min_keep=1)
    assert set(np.flatnonzero(drop)) == {1, 5} and set(np.flatnonzero(restored)) == {9}


def test_eba_per_image_and_threshold_criteria():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6, 0.4, 0.05, 0.95, 0.15])
    owner = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    drop, _ = eliminate(scores, owner, "per_image_fraction", fraction=0.5)  # 2 of 4 per image
    assert set(np.flatnonzero(drop)) == {1, 3, 5, 7, 9, 11}
    drop, _ = eliminate(scores, owner, "threshold", threshold=0.35, min_keep=1)
    assert set(np.flatnonzero(drop)) == {1, 3, 5, 9, 11}
    # a threshold above every score would drop all captions: the guard keeps each image's best
    drop, restored = eliminate(scores, owner, "threshold", threshold=2.0, min_keep=1)
    kept = np.flatnonzero(~drop)
    assert set(kept) == {0, 4, 10} and set(np.flatnonzero(restored)) == {0, 4, 10}
    drop, _ = eliminate(scores, owner, "threshold", threshold=2.0, min_keep=2)
    assert all((~drop)[owner == i].sum() == 2 for i in range(3))
    with pytest.raises(RsitrError, match="eba_criterion"):
        eliminate(scores, owner, "nope")


@pytest.mark.parametrize("criterion", ["global_fraction", "per_image_fraction", "threshold"])
def test_eba_keeps_a_caption_per_image_on_random_inputs(criterion):
    rng = np.random.default_rng(1)
    for _ in range(20):
        owner = np.sort(rng.integers(0, 15, 80))
        owner = np.unique(owner, return_inverse=True)[1]
        scores = rng.normal(size=80)
        drop, restored = eliminate(scores, owner, criterion, fraction=0.9, threshold=1.5, min_keep=1)
        assert all((~drop)[owner == i].any() for i in np.unique(owner))
        assert not (drop & restored).any()


def test_masked_info_nce():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    from rsitr.losses.contrastive import info_nce

    assert masked_info_nce(a, b, 2.0).item() == pytest.approx(info_nce(a, b, 2.0).item(), rel=1e-6)
    keep = torch.tensor([True, False, True, True, False, True])
    full = masked_info_nce(a, b, 2.0, keep)
    # by hand: the kept rows as queries, all columns as candidates
    an, bn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    logits = torch.exp(torch.tensor(2.0)) * an @ bn.t()
    t = torch.arange(6)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits[keep], t[keep]) + torch.nn.functional.cross_entropy(logits.t()[keep], t[keep]))
    assert full.item() == pytest.approx(ref.item(), rel=1e-6)
    assert masked_info_nce(a, b, 2.0, torch.zeros(6, dtype=torch.bool)).item() == 0.0


def test_local_similarity_pairwise_matches_matched():
    torch.manual_seed(0)
    tt, vt = torch.randn(4, 5, 8), torch.randn(4, 7, 8)
    tm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    vm = torch.ones(4, 7, dtype=torch.bool)
    pw = local_similarity(tt, tm, vt, vm)
    assert pw.shape == (4, 4)
    assert torch.allclose(pw.diagonal(), local_similarity(tt, tm, vt, vm, pairwise=False), atol=1e-6)
    # by hand for text 2 (one valid token) against image 1
    c = torch.nn.functional.cosine_similarity(tt[2, 0][None], vt[1], dim=-1).max()
    assert pw[2, 1].item() == pytest.approx(c.item(), abs=1e-6)


# -- KER: keywords and swaps ---------------------------------------------------------------------
CAPTIONS = [
    "three red cars are parked on the left of the road .",
    "a white ship is moored next to the harbour .",
    "many green trees surround a large round pond .",
    "two grey planes are parked near the runway .",
    "Red houses stand in the top right corner .",
    "a river runs from left to right across the field .",
]


def test_vocab_build_and_categories():
    vocab = build_vocab(CAPTIONS * 2, size=100, min_count=2)
    assert {"red", "cars", "left", "three", "trees", "pond"} <= set(vocab)
    assert "the" not in vocab and "are" not in vocab and "parked" not in vocab
    assert category_of("red") == "colour" and category_of("three") == "count" and category_of("one") == "count-one"
    assert category_of("left") == "relation-dir" and category_of("near") == "relation-near"
    assert category_of("cars") == "noun-pl" and category_of("pond") == "noun" and category_of("parked") == "other"
    assert build_vocab(CAPTIONS * 2, size=3) == vocab[:3]  # most frequent first, deterministic


def test_vocab_file_loads(tmp_path):
    if VOCAB_FILE.is_file():
        v = load_vocab(VOCAB_FILE)
        assert len(v) > 500 and v[:3] == ["green", "trees", "many"]
        assert len(load_vocab(VOCAB_FILE, size=64)) == 64
    p = tmp_path / "v.txt"
    p.write_text("# comment\nRed 12\n\nred\ncars\n")
    assert load_vocab(p) == ["red", "cars"]
    p.write_text("b@d 3\n")
    with pytest.raises(DataError, match="not a word"):
        load_vocab(p)
    with pytest.raises(DataError, match="not found"):
        load_vocab(tmp_path / "missing.txt")


def test_keyword_swaps_are_valid_hard_negatives():
    vocab = build_vocab(CAPTIONS * 3, size=200, min_count=1)
    idx = KeywordIndex(vocab)
    rng = np.random.default_rng(0)
    n = 0
    for cap in CAPTIONS:
        for _ in range(30):
            got = idx.swap(cap, rng)
            assert got is not None
            new, old, rep = got
            n += 1
            a, b = words(cap), words(new)
            # exactly one word differs; it was a keyword and becomes a keyword of the same group
            diff = [(x, y) for x, y in zip(a, b) if x != y]
            assert len(a) == len(b) and len(diff) == 1 and diff[0] == (old, rep)
            assert old in idx.index and rep in idx.index and category_of(old) == category_of(rep)
            assert category_of(old) != "other"
            assert rep not in a  # not a word the caption already has
            assert rep not in idx.synonyms.get(old, set())  # never a synonym (no false negative)
            # everything outside the swapped word is kept byte for byte
            i = cap.lower().index(old) if cap.lower().count(old) == 1 else None
            if i is not None:
                assert new[:i] == cap[:i]
    assert n == 30 * len(CAPTIONS)
    # capitalisation of a sentence-initial keyword is kept
    new, old, rep = swap_keyword("Red houses stand here .", ["red", "blue", "houses"], rng=1)
    assert new == "Blue houses stand here ." and (old, rep) == ("red", "blue")
    # synonyms are not offered: car -> vehicle would not change the meaning
    assert swap_keyword("a car .", ["car", "vehicle"]) is None
    # a caption without swappable keywords gives None
    assert swap_keyword("nothing to see here .", vocab) is None


def test_ker_negatives_deterministic_and_distinct(tmp_path):
    from rsitr.data.types import CaptionDataset, ImageEntry

    from rsitr.models.clip import CLIP

    bb = CLIP.from_config("tiny")
    ds = CaptionDataset([ImageEntry(f"i{k}", tmp_path / f"{k}.png", "train", [c]) for k, c in enumerate(CAPTIONS)])
    opts = {"ker": True, "ker_negatives": 3, "ker_min_count": 1}
    m = IEBAKER(bb, opts, ds)
    assert "ker_vocab" not in opts and m.options["ker_vocab"]  # carried by the method's options, the caller's untouched
    texts, _ = ds.texts()
    a = m.ker_negatives(texts, list(range(len(texts))), epoch=2)
    b = m.ker_negatives(texts[::-1], list(range(len(texts)))[::-1], epoch=2)
    ga: dict[int, set] = {}
    for cap, r in zip(*a):
        ga.setdefault(r, set()).add(cap)
    gb: dict[int, set] = {}
    for cap, r in zip(*b):
        gb.setdefault(len(texts) - 1 - r, set()).add(cap)
    assert ga == gb  # same negatives for the same caption whatever the batch order
    assert all(1 <= len(s) <= 3 and texts[r] not in s for r, s in ga.items())
    assert m.ker_negatives(texts, list(range(len(texts))), epoch=3) != a  # new draws next epoch
    # rebuilt without data from the stored options
    m2 = IEBAKER(bb, dict(m.options), None)
    assert m2.kw is not None and m2.kw.vocab == m.kw.vocab
    with pytest.raises(RsitrError, match="ker_vocab"):
        IEBAKER(bb, {"ker": True}, None)
    if VOCAB_FILE.is_file():
        m3 = IEBAKER(bb, {"ker": True, "ker_vocab_file": str(VOCAB_FILE)}, ds)
        assert len(m3.kw) == len(load_vocab(VOCAB_FILE, 512))
    with pytest.raises(RsitrError, match="unknown iebaker option"):
        IEBAKER(bb, {"kerr": True}, ds)
    with pytest.raises(RsitrError, match="local=true"):
        IEBAKER(bb, {"eba": True, "eba_scheme": "separate"}, ds)


def test_ker_swap_loss_is_finite_with_unfilled_negative_slots(tmp_path):
    """A caption with fewer possible swaps than ker_negatives leaves empty slots; their -inf must
    not turn the temperature's gradient into NaN."""
    from rsitr.data.types import CaptionDataset, ImageEntry
    from rsitr.models.clip import CLIP

    torch.manual_seed(0)
    bb = CLIP.from_config("tiny")
    caps = ["a red car on a road .", "a blue car on a road .", "nothing here ."]
    ds = CaptionDataset([ImageEntry(f"i{k}", tmp_path / f"{k}.png", "train", [c]) for k, c in enumerate(caps)])
    m = IEBAKER(bb, {"ker": True, "ker_negatives": 3, "ker_vocab": ["red", "blue"]}, ds)
    negs, rows = m.ker_negatives(caps, [0, 1, 2], 0)
    assert sorted(zip(rows, negs)) == [(0, "a blue car on a road ."), (1, "a red car on a road .")]
    v = torch.randn(3, bb.embed_dim, requires_grad=True)
    t = torch.randn(3, bb.embed_dim, requires_grad=True)
    loss = m._ker_swap_loss(bb, v, t, caps, [0, 1, 2], 0, bb.logit_scale)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(bb.logit_scale.grad).all() and torch.isfinite(v.grad).all()
    # by hand: each of the two rows picks its caption among [itself, its one swap]
    with torch.no_grad():
        z = torch.nn.functional.normalize(bb.encode_text(bb.tokenize(["a blue car on a road .", "a red car on a road ."])), dim=-1)
        vn, tn = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(t, dim=-1)
        sc = bb.logit_scale.exp()
        logits = sc * torch.stack([torch.stack([vn[i] @ tn[i], vn[i] @ z[i]]) for i in range(2)])
        ref = torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# -- SAR ------------------------------------------------------------------------------------------
# 3 images x 4 texts (text j describes image owner[j]); hand-made so that reverse ranks matter
HAND = torch.tensor([
    [0.90, 0.80, 0.70, 0.60],  # image 0 likes every text (a hub)
    [0.85, 0.20, 0.75, 0.10],
    [0.10, 0.79, 0.30, 0.65],
])


def test_sar_hand_computed_ranking():
    # text 0 (column 0): forward images 0 (0.90), 1 (0.85), 2 (0.10)
    #   reverse: image 0 ranks texts [0, 1, 2, 3] -> text 0 at 0; image 1 ranks [0, 2, 1, 3] -> 0;
    #   image 2 ranks [1, 3, 2, 0] -> 3.  k=2 both ways: candidates {0, 1}; both mutual;
    #   keys f/2 + r/2: image 0 -> 0, image 1 -> 0.5 -> order unchanged [0, 1, 2]
    assert sar_order(HAND, 0, "t2i", k=2) == [0, 1, 2]
    # text 2 (column 2): forward 1 (0.75), 0 (0.70), 2 (0.30); candidates {1, 0}
    #   image 1's top-2 texts [0, 2]: text 2 at 1 -> mutual, key 0/2 + 1/2 = 0.5
    #   image 0's top-2 texts [0, 1]: text 2 absent -> not mutual -> after the mutual ones
    #   -> [1, 0, 2] (unchanged)
    assert sar_order(HAND, 2, "t2i", k=2) == [1, 0, 2]
    # text 1 (column 1): forward 0 (0.80), 2 (0.79), 1 (0.20); candidates {0, 2}
    #   image 0's top-2 [0, 1]: text 1 at 1 -> key 0/2 + 1/2 = 0.5
    #   image 2's top-2 [1, 3]: text 1 at 0 -> key 1/2 + 0/2 = 0.5 -> tie, broken by score: 0 first
    assert sar_order(HAND, 1, "t2i", k=2) == [0, 2, 1]
    # with reverse_weight 2 the reverse rank decides: image 0 key 0 + 2*1/2 = 1, image 2 key 0.5
    assert sar_order(HAND, 1, "t2i", k=2, reverse_weight=2.0) == [2, 0, 1]
    # text 3 (column 3): forward 2 (0.65), 0 (0.60), 1 (0.10); candidates {2, 0}
    #   image 2's top-2 [1, 3] -> text 3 at 1 -> key 0 + 1/2 = 0.5; image 0's top-2 [0, 1] -> absent
    #   -> [2, 0, 1]
    assert sar_order(HAND, 3, "t2i", k=2) == [2, 0, 1]
    # image -> text, image 0 (row 0): forward texts 0, 1, 2, 3; candidates {0, 1}
    #   text 0's top-2 images [0, 1] -> image 0 at 0 -> key 0; text 1's top-2 [0, 2] -> 0 -> key 1/2
    assert sar_order(HAND, 0, "i2t", k=2) == [0, 1, 2, 3]
    # image 2 (row 2): forward 1 (0.79), 3 (0.65), 2 (0.30), 0 (0.10); candidates {1, 3}
    #   text 1's top-2 images [0, 2] -> image 2 at 1 -> key 0 + 1/2; text 3's [2, 0] -> at 0 -> key 1/2 + 0
    #   tie -> by score: 1 first
    assert sar_order(HAND, 2, "i2t", k=2) == [1, 3, 2, 0]
    # a case where SAR changes the order: k=3 texts per image, 2 images per text
    #   image 0 (row 0): candidates texts 0, 1, 2 (forward 0, 1, 2); reverse (top-2 images per text):
    #   text 0 [0, 1] -> 0; text 1 [0, 2] -> 0; text 2 [1, 0] -> 1
    #   keys f/3 + r/2: 0, 1/3, 2/3 + 1/2 -> [0, 1, 2, 3];
    #   image 1 (row 1): forward 0 (0.85), 2 (0.75), 1 (0.20), 3; text 0 [0, 1] -> 1; text 2 [1, 0] -> 0;
    #   text 1 [0, 2] -> absent.  keys: text 0 0/3 + 1/2 = 0.5, text 2 1/3 + 0 = 0.33 -> [2, 0, 1, 3]
    assert sar_order(HAND, 1, "i2t", k_t2i=2, k_i2t=3) == [2, 0, 1, 3]


def test_sar_only_reorders_inside_the_candidate_set():
    torch.manual_seed(0)
    s = torch.randn(40, 200)
    for kc, kr in [(10, 10), (5, 20), (1, 3), (40, 200)]:
        for direction in ("both", "t2i", "i2t"):
            r = sar(s, k_t2i=kc, k_i2t=kr, direction=direction, chunk=7)
            assert r.shape == s.shape
            assert torch.equal(r, sar(s, k_t2i=kc, k_i2t=kr, direction=direction))  # chunking changes nothing
            if direction in ("both", "t2i"):
                a, b = _desc(s, 0)[:kc], _desc(r, 0)[:kc]
                assert all(set(a[:, j].tolist()) == set(b[:, j].tolist()) for j in range(s.shape[1]))
                # below the candidate depth nothing moves
                assert torch.equal(_desc(s, 0)[kc:], _desc(r, 0)[kc:]) or direction == "both"
            if direction in ("both", "i2t"):
                a, b = _desc(s, 1)[:, :kr], _desc(r, 1)[:, :kr]
                assert all(set(a[i].tolist()) == set(b[i].tolist()) for i in range(s.shape[0]))
            if direction != "both":  # the one-direction form only permutes scores within each list
                dim = 0 if direction == "t2i" else 1
                assert torch.equal(torch.sort(r, dim=dim).values, torch.sort(s, dim=dim).values)
        # the joint matrix gives the same orders as each one-direction form
        rb = sar(s, k_t2i=kc, k_i2t=kr)
        assert torch.equal(_desc(rb, 0)[:kc], _desc(sar(s, k_t2i=kc, k_i2t=kr, direction="t2i"), 0)[:kc])
        assert torch.equal(_desc(rb, 1)[:, :kr], _desc(sar(s, k_t2i=kc, k_i2t=kr, direction="i2t"), 1)[:, :kr])
    # R@K for K >= k is unchanged (the candidate sets are)
    from rsitr.retrieval.metrics import retrieval_metrics

    owner = [j // 5 for j in range(200)]
    m0, m1 = retrieval_metrics(s, owner), retrieval_metrics(sar(s, k=10), owner)
    assert m0["i2t_r10"] == m1["i2t_r10"] and m0["t2i_r10"] == m1["t2i_r10"]
    with pytest.raises(ValueError):
        sar(s, direction="sideways")
    with pytest.raises(ValueError):
        sar(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        sar(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="reverse_weight"):
        sar(s, reverse_weight=2.0)  # one joint matrix needs equal weights


def test_sar_top_lists_chunked_memory_shape():
    s = torch.randn(30, 70, dtype=torch.float64)
    ct, rt = top_lists(s, 4, 6, chunk=8)
    assert ct.shape == (4, 70) and rt.shape == (30, 6)
    assert torch.equal(ct, _desc(s, 0)[:4]) and torch.equal(rt, _desc(s, 1)[:, :6])


# -- the method in the loop ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_synth(synth_dataset) -> Path:
    return synth_dataset(n_images=24, seed=5, image_size=32, noise_frac=0.3)


def test_iebaker_trains_writes_eba_file_and_reloads(noisy_synth, tmp_path):
    from rsitr.bench.iebaker import eba_files_quality, noisy_flags
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import evaluate
    from rsitr.methods.factory import load
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    out = tmp_path / "run"
    cfg = TrainConfig().override({
        "data.path": str(noisy_synth), "out_dir": str(out), "model.backbone": "clip:tiny", "model.mode": "full",
        "epochs": 1, "max_steps": 3, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 64, "seed": 1,
        "augment.enabled": False, "method.name": "iebaker",
        "method.options": {"eba": True, "eba_warmup_epochs": 0, "eba_fraction": 0.25, "eba_scheme": "separate", "local": True,
                           "ker": True, "ker_mode": "both", "ker_min_count": 1, "sar": True},
    })
    res = train(cfg, progress=False)
    assert res.test is not None and 0 <= res.test["mR"] <= 100
    data = load_dataset(str(noisy_synth))
    train_ds = data.split("train")
    n = train_ds.n_captions
    with open(out / "eba_epoch1.tsv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    texts, owner = train_ds.texts()
    k = int(np.floor(0.25 * n))
    for col, key in (("global", "score_global"), ("local", "score_local")):
        el = [r for r in rows if r["dropped_from"] in (col, "all")]
        assert len(el) <= k and len(el) >= k - len(train_ds)  # the guard restores at most one per image
        assert all(texts[int(r["text_index"])] == r["caption"] for r in el)
        # every image keeps a caption in each loss
        gone = {int(r["text_index"]) for r in el}
        assert all(any(t not in gone for t in range(len(owner)) if owner[t] == i) for i in range(len(train_ds)))
    flags = noisy_flags(noisy_synth, train_ds)
    assert flags is not None and flags.shape == (n,) and 0 < flags.sum() < n
    q = eba_files_quality(out, flags)
    assert [x["epoch"] for x in q] == [1] and 0 <= q[0]["recall"] <= 1
    loaded = load(str(out))
    method = loaded.method
    assert method.name == "iebaker" and method.kw is not None and method.sar_enabled and method.capabilities.reranker == "sar"
    m = evaluate(loaded.backbone, data.split("test"), method=method, progress=False)
    assert m["mR"] == pytest.approx(res.test["mR"])
    # SAR can be switched at evaluation time through the options
    method.opts.sar = False
    method.opts.rerank = "sar"
    assert evaluate(loaded.backbone, data.split("test"), method=method, progress=False)["mR"] == pytest.approx(res.test["mR"])


def test_resume_mid_epoch_after_eba_is_exact(noisy_synth, tmp_path):
    """The EBA flags and the filtered order are checkpointed: killed after step 2 and resumed, a
    run with EBA (separate scheme) and KER ends with the same weights as an uninterrupted one."""
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    class Crash(Exception):
        pass

    def crash(step):
        if step == 2:
            raise Crash

    def cfg(out):
        return TrainConfig().override({
            "data.path": str(noisy_synth), "out_dir": str(out), "model.backbone": "clip:tiny", "model.mode": "full",
            "epochs": 1, "max_steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "seed": 2, "save_every_steps": 1,
            "augment.enabled": False, "method.name": "iebaker",
            "method.options": {"eba": True, "eba_warmup_epochs": 0, "eba_fraction": 0.3, "eba_scheme": "separate", "local": True,
                               "ker": True, "ker_min_count": 1},
        })

    train(cfg(tmp_path / "a"), progress=False, evaluate_test=False)
    with pytest.raises(Crash):
        train(cfg(tmp_path / "b"), progress=False, evaluate_test=False, on_step=crash)
    train(cfg(tmp_path / "b"), resume=True, progress=False, evaluate_test=False)
    sa = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)["state"]
    sb = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)["state"]
    assert sa.keys() == sb.keys() and "method.eba_drop" in sa
    assert int(sa["method.eba_drop"].ne(0).sum()) > 0
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_ker_pool_uses_cached_trunk_features(tmp_path):
    """With a swap pool and a frozen text trunk, negatives come from cached trunk outputs plus the
    head - the same embeddings a full text forward gives."""
    from torch import nn

    from rsitr.data.types import CaptionDataset, ImageEntry
    from rsitr.models.base import BackboneCapabilities, Features, SplitBackbone
    from rsitr.models.clip import CLIP

    class Split(CLIP, SplitBackbone):  # a CLIP that declares a trunk/head split on the text side (frozen trunk)
        capabilities = BackboneCapabilities(trunk_cache=True, adapter_slots=dict(CLIP.capabilities.adapter_slots))

        def text_trunk(self, ids, core=None):
            f = CLIP.text_features(self, ids)
            return Features(f.pooled, f.tokens, f.mask)

        def text_head(self, f):
            return Features(self.head(f.pooled), self.head(f.tokens), f.mask)

        def text_features(self, ids):
            return self.text_head(self.text_trunk(ids))

        def image_trunk(self, px):
            return self.image_features(px)

        def image_head(self, f):
            return f

        def trunk_trainable(self, modality):
            return False

    torch.manual_seed(0)
    bb = Split.from_config("tiny")
    bb.head = nn.Linear(bb.embed_dim, bb.embed_dim)
    ds = CaptionDataset([ImageEntry(f"i{k}", tmp_path / f"{k}.png", "train", [c]) for k, c in enumerate(CAPTIONS)])
    m = IEBAKER(bb, {"ker": True, "ker_negatives": 2, "ker_pool": 3, "ker_min_count": 1}, ds)
    texts, _ = ds.texts()
    negs, rows = m.ker_negatives(texts, list(range(len(texts))), 0)
    assert all(n in m._pool_of(r) for n, r in zip(negs, rows)) and all(len(m._pool_of(t)) == 3 for t in range(len(texts)))
    z = m._negative_features(bb, negs, torch.device("cpu"))
    assert len(m._pool_cache) == sum(len(m._pool_of(t)) for t in range(len(texts)))  # the whole pool, once
    with torch.no_grad():
        ref = bb.text_features(bb.tokenize(negs)).pooled
    assert torch.allclose(z, ref, atol=1e-5)
    z.sum().backward()
    assert bb.head.weight.grad is not None  # the head trains through the cached features


@pytest.mark.slow
def test_cli_bench_iebaker_and_eval_rerank_sar(noisy_synth, tmp_path, capsys):
    """`rsitr bench iebaker` runs the chosen variants of the iebaker-ablation suite with one budget
    and prints the report;
    `rsitr eval --rerank sar` on the baseline checkpoint equals SAR applied to its matrix."""
    import json

    from rsitr.cli import main
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import similarity
    from rsitr.methods.factory import load_model
    from rsitr.retrieval.metrics import retrieval_metrics

    out = tmp_path / "abl"
    rc = main(["-q", "bench", "iebaker", "--data", str(noisy_synth), "--out", str(out), "--backbone", "clip:tiny",
               "--mode", "full", "--epochs", "1", "--max-steps", "2", "--variants", "baseline", "+SAR",
               "--set", "batch_size=8", "--set", "augment.enabled=false", "--set", "eval_batch_size=64"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| baseline | clip:tiny (full) |" in table and "| +SAR | clip:tiny (full) |" in table
    assert (out / "report.json").is_file() and (out / "report.md").read_text() in table
    assert "eba_filter" not in table.split("## Suite")[0]  # no variant ran EBA: nothing to measure
    spec = json.loads((out / "cells" / noisy_synth.parent.name / "+SAR" / "seed0" / "spec.json").read_text())
    assert spec["overrides"]["method.options"] == {"eba_fraction": 0.2, "sar": True}  # the suite's shared options under the variant's
    run = out / "cells" / noisy_synth.parent.name / "baseline" / "seed0" / "run"
    rc = main(["-q", "eval", "--data", str(noisy_synth), "--checkpoint", str(run), "--rerank", "sar", "--rerank-k", "5", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rerank"] == "sar"
    model = load_model(str(run))
    sim, t2i = similarity(model, load_dataset(str(noisy_synth)).split("test"), progress=False)
    want = retrieval_metrics(sar(sim, k=5), t2i)
    assert got["mR"] == pytest.approx(float(want["mR"]))
