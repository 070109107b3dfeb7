"""The field's retrieval protocol: hand-worked cases, ties, chunking, a naive reference."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsitr.retrieval.metrics import METRIC_KEYS, format_table, ranks_i2t, ranks_t2i, retrieval_metrics

# --- a hand-worked case -----------------------------------------------------------------------
# 3 images x 6 texts; texts 0,1 describe image 0, texts 2,3 image 1, texts 4,5 image 2.
#
#            t0    t1    t2    t3    t4    t5
# image 0   0.9   0.1   0.8   0.2   0.3   0.4
# image 1   0.5   0.6   0.1   0.2   0.7   0.3
# image 2   0.2   0.3   0.4   0.1   0.05  0.6
#
# I2T (rank of the best of the image's own captions = number of texts scoring strictly higher):
#   image 0: own t0=0.9, t1=0.1 -> best 0.9, nothing higher                    -> rank 0
#   image 1: own t2=0.1, t3=0.2 -> best 0.2, higher: t0 .5, t1 .6, t4 .7, t5 .3 -> rank 4
#   image 2: own t4=0.05, t5=0.6 -> best 0.6, nothing higher                   -> rank 0
#   R@1 = 2/3 = 66.67, R@5 = R@10 = 100
# T2I (number of images scoring strictly higher than the caption's own image, per column):
#   t0: (.9 .5 .2) own .9 -> 0     t1: (.1 .6 .3) own .1 -> 2     t2: (.8 .1 .4) own .1 -> 2
#   t3: (.2 .2 .1) own .2 -> 0 (image 0 ties with it: a tie does not count, optimistic rank)
#   t4: (.3 .7 .05) own .05 -> 2   t5: (.4 .3 .6) own .6 -> 0
#   R@1 = 3/6 = 50, R@5 = R@10 = 100
# mR = (66.67 + 100 + 100 + 50 + 100 + 100) / 6 = 86.11
SIM_3x6 = np.array(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
        [0.5, 0.6, 0.1, 0.2, 0.7, 0.3],
        [0.2, 0.3, 0.4, 0.1, 0.05, 0.6],
    ]
)
OWNER_3x6 = [0, 0, 1, 1, 2, 2]


def test_hand_worked_3x6():
    assert ranks_i2t(SIM_3x6, OWNER_3x6).tolist() == [0, 4, 0]
    assert ranks_t2i(SIM_3x6, OWNER_3x6).tolist() == [0, 2, 2, 0, 2, 0]
    m = retrieval_metrics(SIM_3x6, OWNER_3x6, ties="optimistic")
    assert list(m) == list(METRIC_KEYS)
    assert all(type(v) is float for v in m.values())
    assert m["i2t_r1"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 100.0
    assert m["t2i_r1"] == pytest.approx(50.0)
    assert m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert m["mR"] == pytest.approx((200 / 3 + 100 + 100 + 50 + 100 + 100) / 6)
    # torch input, float32 and float16, text_to_image as a tensor: the same
    for t in (torch.tensor(SIM_3x6), torch.tensor(SIM_3x6, dtype=torch.float32), torch.tensor(SIM_3x6).half()):
        assert retrieval_metrics(t, torch.tensor(OWNER_3x6), ties="optimistic") == pytest.approx(m)


def test_hand_worked_staircase_12():
    # 12 images, one caption each (text j <-> image j); sim[i, j] = 1 if i < j, 0 if i == j, -1 if i > j.
    # Column j: exactly the j images 0..j-1 score higher than image j  -> t2i rank of text j = j.
    # Row i: the texts j > i score higher than text i (n-1-i of them)  -> i2t rank of image i = 11 - i.
    # Both directions: ranks 0..11 once each -> R@1 = 1/12, R@5 = 5/12, R@10 = 10/12.
    n = 12
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    sim = np.sign(j - i).astype(np.float32)
    assert ranks_t2i(sim, range(n)).tolist() == list(range(n))
    assert ranks_i2t(sim, range(n)).tolist() == list(range(n - 1, -1, -1))
    m = retrieval_metrics(sim, list(range(n)))
    for d in ("i2t", "t2i"):
        assert m[f"{d}_r1"] == pytest.approx(100 / 12)
        assert m[f"{d}_r5"] == pytest.approx(500 / 12)
        assert m[f"{d}_r10"] == pytest.approx(1000 / 12)
    assert m["mR"] == pytest.approx((100 + 500 + 1000) / 36)


def test_perfect_similarity_gives_100():
    owner = np.repeat(np.arange(20), 5)
    rng = np.random.default_rng(0)
    rng.shuffle(owner)
    sim = (owner[None, :] == np.arange(20)[:, None]).astype(np.float32) + 0.01 * rng.random((20, 100))
    sim.setflags(write=False)  # read-only input is fine (never written)
    m = retrieval_metrics(sim, owner)
    assert all(v == 100.0 for v in m.values())


def test_optimistic_ties():
    owner = np.repeat(np.arange(4), 5)
    # every score equal: nothing is strictly higher than a ground truth -> all ranks 0
    m = retrieval_metrics(np.zeros((4, 20)), owner, ties="optimistic")
    assert all(v == 100.0 for v in m.values())
    assert ranks_i2t(np.zeros((4, 20)), owner).tolist() == [0, 0, 0, 0]
    # a wrong candidate tied with the ground truth does not push it down; a higher one does
    sim = np.zeros((2, 2))
    sim[0] = [1.0, 1.0]  # image 0: its text 0 ties with text 1 -> rank 0
    sim[1] = [2.0, 1.0]  # image 1: text 0 beats its text 1 -> rank 1
    # text 0: image 1 (2.0) beats image 0 (1.0) -> rank 1; text 1: images tie at 1.0 -> rank 0
    assert ranks_i2t(sim, [0, 1]).tolist() == [0, 1]
    assert ranks_t2i(sim, [0, 1]).tolist() == [1, 0]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_chunking_matches_single_chunk(chunk):
    rng = np.random.default_rng(1)
    n_img = 37
    owner = np.concatenate([np.arange(n_img), rng.integers(0, n_img, 80)])
    rng.shuffle(owner)
    sim = rng.integers(-3, 4, size=(n_img, owner.size)).astype(np.float32)  # many ties
    whole = (ranks_i2t(sim, owner, chunk_size=n_img), ranks_t2i(sim, owner, chunk_size=n_img))
    assert np.array_equal(ranks_i2t(sim, owner, chunk_size=chunk), whole[0])
    assert np.array_equal(ranks_t2i(sim, owner, chunk_size=chunk), whole[1])
    assert retrieval_metrics(sim, owner, chunk_size=chunk) == retrieval_metrics(sim, owner, chunk_size=n_img)
    assert retrieval_metrics(sim, owner) == retrieval_metrics(sim, owner, chunk_size=n_img)  # automatic
    # integer scores and a negative-stride view give the same answers
    assert retrieval_metrics(sim.astype(np.int32), owner, chunk_size=chunk) == retrieval_metrics(sim, owner)
    flipped = sim[::-1].copy()[::-1]  # same values, negative row stride
    assert flipped.strides[0] < 0
    assert np.array_equal(ranks_t2i(flipped, owner, chunk_size=chunk), whole[1])


# --- a naive reference on random data ----------------------------------------------------------
def naive(sim: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    n_img, n_txt = sim.shape
    r_i2t = []
    for i in range(n_img):
        own = [j for j in range(n_txt) if owner[j] == i]
        r_i2t.append(min(sum(1 for t in range(n_txt) if sim[i, t] > sim[i, j]) for j in own))
    r_t2i = [sum(1 for i in range(n_img) if sim[i, j] > sim[owner[j], j]) for j in range(n_txt)]
    out = {}
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(x < k for x in r) / len(r)
    out["mR"] = sum(out.values()) / 6
    return out


@st.composite
def problems(draw):
    n_img = draw(st.integers(1, 14))
    per_image = draw(st.lists(st.integers(1, 5), min_size=n_img, max_size=n_img))
    owner = np.repeat(np.arange(n_img), per_image)
    perm = draw(st.permutations(list(range(owner.size))))
    owner = owner[np.array(perm, dtype=np.int64)]
    ints = draw(st.booleans())
    elems = st.integers(-3, 3) if ints else st.floats(-1e3, 1e3, allow_nan=False, width=32)
    values = draw(st.lists(elems, min_size=n_img * owner.size, max_size=n_img * owner.size))
    sim = np.array(values, dtype=np.float32).reshape(n_img, owner.size)
    chunk = draw(st.integers(1, 16))
    return sim, owner, chunk


@settings(max_examples=150, deadline=None)
@given(problems())
def test_matches_naive_reference(problem):
    sim, owner, chunk = problem
    got = retrieval_metrics(sim, owner, chunk_size=chunk, ties="optimistic")
    ref = naive(sim, owner)
    assert got == pytest.approx(ref)
    assert retrieval_metrics(torch.from_numpy(sim), owner.tolist(), chunk_size=chunk, ties="optimistic") == pytest.approx(ref)


# --- validation -------------------------------------------------------------------------------
def test_validation_errors():
    sim = np.zeros((3, 6))
    with pytest.raises(ValueError, match="shape mismatch"):
        retrieval_metrics(sim, [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(sim, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(sim, [0, 0, 1, 1, 2, -1])
    with pytest.raises(ValueError, match="no text"):
        retrieval_metrics(sim, [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(6), [0] * 6)
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 0)), [])
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(sim, [0, 0.5, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="NaN"):
        bad = sim.copy()
        bad[1, 2] = np.nan
        retrieval_metrics(bad, OWNER_3x6)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(sim, OWNER_3x6, chunk_size=0)


def test_large_split_runs_in_chunks():
    # 5,000 images x 25,000 captions, float32 (500 MB): ground truth pairs get a bonus -> 100%.
    n_img, per = 5000, 5
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(n_img, n_img * per, generator=g)
    owner = torch.arange(n_img * per) // per
    sim[owner, torch.arange(n_img * per)] += 1.0
    sim[7, 3] = 5.0  # text 3 (image 0) now ranks image 7 first; image 7's own texts lose one place
    t0 = time.perf_counter()
    m = retrieval_metrics(sim, owner)
    elapsed = time.perf_counter() - t0
    assert m["t2i_r1"] == pytest.approx(100 * (1 - 1 / (n_img * per)))
    assert m["t2i_r5"] == 100.0
    assert m["i2t_r1"] == pytest.approx(100 * (1 - 1 / n_img))
    assert m["i2t_r5"] == 100.0
    assert elapsed < 30


# --- table ------------------------------------------------------------------------------------
def test_format_table():
    m = retrieval_metrics(SIM_3x6, OWNER_3x6, ties="optimistic")
    table = format_table(m)
    lines = table.splitlines()
    assert lines[0] == "| model | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | mR |"
    assert lines[1].startswith("|---|")
    assert lines[2] == "| model | 66.67 | 100.00 | 100.00 | 50.00 | 100.00 | 100.00 | 86.11 |"

    many = format_table([("CLIP zero-shot", m), ("a|b", {"mR": 1.004, "i2t_r1": 3})], title="RSICD test")
    lines = many.splitlines()
    assert lines[0] == "RSICD test" and lines[1] == ""
    assert lines[2].startswith("| model |")
    assert lines[4].startswith("| CLIP zero-shot | 66.67 |")
    assert lines[5] == "| a\\|b | 3.00 | - | - | - | - | - | 1.00 |"
    assert format_table({"x": m, "y": m}).count("| 86.11 |") == 2
    with pytest.raises(ValueError):
        format_table([("only a name",)])


def test_tie_modes_hand_worked():
    # 3x6 case: the only tie is text 3 (own image 1 at .2, image 0 also .2): g=0, t=1, m=1.
    # expected: P(hit@1) = 1 - C(1,1)/C(2,1) = 1/2 -> t2i R@1 = (3 + 0.5)/6; pessimistic: 3/6... minus t3 -> 2/6
    e = retrieval_metrics(SIM_3x6, OWNER_3x6)  # default "expected"
    assert e["t2i_r1"] == pytest.approx(100 * 2.5 / 6)
    p = retrieval_metrics(SIM_3x6, OWNER_3x6, ties="pessimistic")
    assert p["t2i_r1"] == pytest.approx(100 * 2 / 6)
    for m in (e, p):
        assert m["i2t_r1"] == pytest.approx(200 / 3) and m["t2i_r5"] == 100.0
    # image query with 2 own captions tied with 3 copies under other images, nothing higher:
    # n = 5, m = 2; hit@1 = 1 - C(4,2)/C(5,2) = 1 - 6/10 = 0.4; hit@2 = 1 - C(3,2)/C(5,2) = 0.7
    # hit@4 = 1 - C(1,2)/C(5,2) = 1 (at most 3 wrong ones can come first)
    owner = [0, 0, 1, 2, 3]
    sim = np.array([[1.0, 1.0, 1.0, 1.0, 1.0], [0, 0, 5, 0, 0], [0, 0, 0, 5, 0], [0, 0, 0, 0, 5]], dtype=np.float32)
    from rsitr.retrieval.metrics import hit_probability, tie_counts

    c = tie_counts(sim, owner)
    assert c["i2t_greater"][0] == 0 and c["i2t_tied"][0] == 3 and c["i2t_gts"][0] == 2
    assert hit_probability([0], [3], [2], 1)[0] == pytest.approx(0.4)
    assert hit_probability([0], [3], [2], 2)[0] == pytest.approx(0.7)
    assert hit_probability([0], [3], [2], 4)[0] == pytest.approx(1.0)
    assert hit_probability([2], [3], [2], 1)[0] == 0.0
    m = retrieval_metrics(sim, owner)
    assert m["i2t_r1"] == pytest.approx(100 * (0.4 + 3) / 4)
    # no ties: the three modes agree
    rng = np.random.default_rng(3)
    sim = rng.random((9, 30))
    own = np.repeat(np.arange(9), [4, 3, 3, 3, 3, 3, 3, 4, 4])
    ms = [retrieval_metrics(sim, own, ties=t) for t in ("expected", "optimistic", "pessimistic")]
    assert ms[0] == pytest.approx(ms[1]) and ms[1] == pytest.approx(ms[2])
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(sim, own, ties="random")


def test_expected_ties_match_random_tie_breaking():
    """Monte Carlo: average recall over random tie-breaks (argsort of a jittered matrix)."""
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(12), 3)
    sim = rng.integers(0, 3, size=(12, 36)).astype(np.float64)  # heavy ties
    want = retrieval_metrics(sim, owner)
    acc = {k: 0.0 for k in want}
    n = 3000
    for _ in range(n):
        jit = sim + 1e-6 * rng.random(sim.shape)  # random order within each tie group
        for k, v in retrieval_metrics(jit, owner, ties="optimistic").items():
            acc[k] += v / n
    for k in want:
        assert acc[k] == pytest.approx(want[k], abs=1.0), k
