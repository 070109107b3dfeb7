"""Concurrent text queries are encoded in batches (rsitr.search.coalesce): each caller gets its
own row, a busy encoder collects the queries that queue meanwhile, a bad query fails only itself."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rsitr.search.coalesce import Coalescer


def _rows(queries):
    return np.array([[float(q), 2.0 * float(q)] for q in queries], np.float32)


def test_an_idle_coalescer_encodes_a_query_alone_at_once():
    calls = []
    c = Coalescer(lambda qs: calls.append(list(qs)) or _rows(qs))
    np.testing.assert_array_equal(c.encode(3), [[3.0, 6.0]])
    assert calls == [[3]]


def test_queries_that_queue_during_an_encode_go_in_one_batch_and_get_their_own_rows():
    started, release = threading.Event(), threading.Event()
    calls = []

    def encode_many(qs):
        calls.append(list(qs))
        if len(calls) == 1:  # hold the first call until the others have queued
            started.set()
            release.wait(10)
        return _rows(qs)

    c = Coalescer(encode_many, max_batch=4)
    out: dict[int, np.ndarray] = {}

    def ask(q):
        out[q] = c.encode(q)

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=ask, args=(q,)) for q in range(1, 7)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while len(c._pending) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert calls[0] == [0]
    assert sorted(len(b) for b in calls[1:]) == [2, 4]  # 6 queued, at most 4 a call
    assert sorted(q for b in calls for q in b) == list(range(7))
    for q in range(7):
        np.testing.assert_array_equal(out[q], [[q, 2.0 * q]])


def test_a_bad_query_fails_only_itself():
    def encode_many(qs):
        if -1 in qs:
            raise ValueError("bad query")
        return _rows(qs)

    c = Coalescer(encode_many)
    c._running = True  # as if an encode were running: the next caller finds both queued
    results: dict[int, object] = {}

    def ask(q):
        try:
            results[q] = c.encode(q)
        except ValueError as exc:
            results[q] = exc

    threads = [threading.Thread(target=ask, args=(q,)) for q in (5, -1)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(c._pending) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with c._cond:
        c._running = False
        c._cond.notify_all()
    for t in threads:
        t.join(10)
    np.testing.assert_array_equal(results[5], [[5.0, 10.0]])
    assert isinstance(results[-1], ValueError)


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        Coalescer(_rows, max_batch=0)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    pytest.importorskip("faiss")
    from rsitr.bench.search import write_sample_source
    from rsitr.search import build as B

    root = tmp_path_factory.mktemp("coalesce")
    src = write_sample_source(root / "src", n_png=4, grid=(1, 2), tile=64)
    B.build_index(src, "clip:tiny", root / "idx", B.BuildOptions(tile_size=64, engine="torch", progress=False))
    return root / "idx"


def test_concurrent_search_engine_text_queries_equal_their_encodes_alone(index_dir):
    """A SearchEngine under concurrent text queries: batched encodes (more than one query a call)
    give every query its own vector, equal to its encode alone within 1e-5."""
    from rsitr.search.engine import SearchEngine

    eng = SearchEngine(index_dir, engine="torch")
    queries = [f"{n} storage tanks next to a harbour and a road" for n in range(12)] + ["a river", "planes"]
    alone = {q: eng._encode_texts([q]) for q in queries}
    sizes = []
    real = eng._encode_texts

    def slow(qs):
        sizes.append(len(qs))
        time.sleep(0.05)  # keep the encoder busy so that queries queue
        return real(qs)

    eng._texts.encode_many = slow
    got: dict[str, np.ndarray] = {}
    threads = [threading.Thread(target=lambda q=q: got.__setitem__(q, eng.encode_text(q))) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert max(sizes) > 1 and sum(sizes) == len(queries)
    for q in queries:
        assert got[q].shape == alone[q].shape
        np.testing.assert_allclose(got[q], alone[q], atol=1e-5, rtol=0)


def test_searches_and_thumbnails_do_not_wait_for_the_model(index_dir):
    """While a forward pass holds the model lock, a vector search and a cached thumbnail answer."""
    from rsitr.search.engine import SearchEngine

    eng = SearchEngine(index_dir, engine="torch")
    q = eng.encode_text("a river")
    thumb = eng.thumbnail(0, size=64)
    done: dict[str, object] = {}

    def other_work():
        done["search"] = eng.search_vector(q, 3)
        done["thumb"] = eng.thumbnail(0, size=64)

    with eng._lock:  # as if an encode were running
        t = threading.Thread(target=other_work, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "a search or a thumbnail waited for the model"
    assert len(done["search"]) == 3 and done["thumb"] == thumb
