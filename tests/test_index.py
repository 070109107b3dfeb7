"""VectorIndex (FAISS) and TokenStore: search correctness and exact save/load round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from rsitr.retrieval.index import TokenStore, VectorIndex, l2_normalize  # noqa: E402
from rsitr.utils.errors import RsitrError  # noqa: E402


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((400, 24)).astype(np.float32), rng.standard_normal((7, 24)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_round_trip_exact(kind, data, tmp_path):
    x, q = data
    ix = VectorIndex(24, kind, nlist=8, nprobe=4)
    ix.add(x[:250])
    ix.add(torch.from_numpy(x[250:]))  # torch input and a second add
    assert len(ix) == 400
    s, i = ix.search(q, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == (7, 10)
    assert np.all(np.diff(s, axis=1) <= 1e-6)  # best first
    path = ix.save(tmp_path / f"{kind}.faiss")
    assert (tmp_path / f"{kind}.faiss.json").is_file()
    back = VectorIndex.load(path)
    assert back.kind == kind and len(back) == 400 and back.params() == ix.params()
    s2, i2 = back.search(q, 10)
    assert np.array_equal(i, i2) and np.array_equal(s, s2)


def test_flat_is_exact_cosine_and_k_is_clipped(data):
    x, q = data
    ix = VectorIndex(24)
    ix.add(x[:30])
    s, i = ix.search(q, 100)
    assert s.shape == (7, 30)
    ref = l2_normalize(q) @ l2_normalize(x[:30]).T
    assert np.array_equal(i, np.argsort(-ref, axis=1, kind="stable")) or np.allclose(np.take_along_axis(ref, i, 1), s, atol=1e-5)
    assert np.allclose(np.take_along_axis(ref, i, 1), s, atol=1e-5)


def test_index_errors(data, tmp_path):
    x, _ = data
    with pytest.raises(RsitrError, match="kind"):
        VectorIndex(4, "lsh")
    ivf = VectorIndex(24, "ivf", nlist=64)
    with pytest.raises(RsitrError, match="at least 64"):
        ivf.add(x[:10])
    with pytest.raises(RsitrError, match="empty"):
        ivf.save(tmp_path / "x.faiss")
    with pytest.raises(RsitrError, match="shape"):
        VectorIndex(24).add(np.zeros((3, 5)))
    (tmp_path / "y.faiss").write_bytes(b"junk")
    with pytest.raises(RsitrError, match="parameter file"):
        VectorIndex.load(tmp_path / "y.faiss")


@pytest.mark.parametrize("top_n,select", [(None, "norm"), (3, "norm"), (3, "pooled")])
def test_token_store_round_trip(top_n, select, tmp_path):
    g = torch.Generator().manual_seed(1)
    st = TokenStore(top_n=top_n, select=select)
    t1, m1 = torch.randn(4, 6, 8, generator=g), torch.ones(4, 6, dtype=torch.bool)
    m1[1, 2:] = False
    t2 = torch.randn(3, 5, 8, generator=g)  # narrower batch: padded to the store width
    st.append(t1, m1, pooled=torch.randn(4, 8, generator=g))
    st.append(t2, None, pooled=torch.randn(3, 8, generator=g))
    assert len(st) == 7
    st.save(tmp_path / "tok")
    back = TokenStore.load(tmp_path / "tok")
    assert isinstance(back.tokens, np.memmap) and back.tokens.dtype == np.float16
    ids = [6, 0, 1, 1, 3]
    a, am = st.get(ids)
    b, bm = back.get(ids)
    assert a.dtype == torch.float32 and am.dtype == torch.bool
    assert torch.equal(a, b) and torch.equal(am, bm)
    width = 6 if top_n is None else 3
    assert a.shape == (5, width, 8)
    assert bool(am[0].sum() == (5 if top_n is None else 3)) and int(am[2].sum()) == 2  # image 1 has 2 real tokens
    # stored tokens are unit vectors (fp16), padding is zero
    n = a.norm(dim=-1)
    assert torch.allclose(n[am], torch.ones(int(am.sum())), atol=2e-3) and torch.all(n[~am] == 0)


def test_token_store_top_n_keeps_largest_norm():
    t = torch.zeros(1, 5, 2)
    t[0, :, 0] = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0])
    st = TokenStore(top_n=2)
    st.append(t)
    got, _ = st.get([0])
    assert got.shape == (1, 2, 2)  # tokens 1 and 3 (norms 5, 4), normalised, order kept
    assert torch.allclose(got[0, :, 0], torch.ones(2))
    st2 = TokenStore(top_n=2, normalize=False)
    st2.append(t)
    assert st2.get([0])[0][0, :, 0].tolist() == [5.0, 4.0]


@pytest.mark.parametrize("n,nlist", [(300, 4), (3000, 8), (5000, None), (20000, 16)])
def test_ivf_first_add_trains_on_a_bounded_sample(n, nlist, monkeypatch):
    """An IVF index's k-means sees at most IVF_TRAIN_PER_CELL vectors per cell (a seeded sample)
    whatever the first add holds, and searches as well as one trained on everything: the
    explicit ``--index-kind ivf`` path no longer runs k-means over the whole archive."""
    import rsitr.retrieval.index as I

    rng = np.random.default_rng(n)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, 32)).astype(np.float32)
    seen = []
    real = I.VectorIndex._build

    def spy(self):
        idx = real(self)
        train = idx.train
        idx.train = lambda v: seen.append(len(v)) or train(v)
        return idx

    monkeypatch.setattr(I.VectorIndex, "_build", spy)
    ix = VectorIndex(32, "ivf", nlist=nlist, nprobe=4)
    ix.add(x)
    want_nlist = nlist if nlist is not None else round(4 * np.sqrt(n))
    assert ix.nlist == want_nlist and ix.params()["nlist"] == want_nlist
    assert seen == [min(n, I.IVF_TRAIN_PER_CELL * want_nlist)]
    flat = VectorIndex(32)
    flat.add(x)
    q = x[rng.choice(n, 50, replace=False)] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    got, exact = ix.search(q, 10)[1], flat.search(q, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)]) > 0.8
    again = VectorIndex(32, "ivf", nlist=nlist, nprobe=4)
    again.add(x)
    assert np.array_equal(again.search(q, 10)[1], got)  # the sample is seeded: the same index twice
