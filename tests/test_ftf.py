"""FTF: parameter-free interaction, two-stage retrieval and the method in the training loop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("faiss")

from rsitr.retrieval.interaction import fine_scores, fine_scores_paired, interaction_scores  # noqa: E402
from rsitr.retrieval.twostage import OFFSET, exhaustive, search_t2i, two_stage  # noqa: E402


def _toy(n=12, m=20, np_=9, nw=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ci, ct = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    it, tt = torch.randn(n, np_, d, generator=g), torch.randn(m, nw, d, generator=g)
    im = torch.rand(n, np_, generator=g) > 0.2
    tm = torch.rand(m, nw, generator=g) > 0.3
    im[:, 0] = tm[:, 0] = True
    return ci, ct, it, im, tt, tm


def _brute(p, mp, w, mw, tau=0.1, balance=0.5):
    p, w = F.normalize(p[mp], dim=-1), F.normalize(w[mw], dim=-1)
    s = w @ p.t()
    v = torch.softmax(s / tau, 1) @ p
    t = torch.softmax(s.t() / tau, 1) @ w
    return balance * F.cosine_similarity(w, v, dim=-1).mean() + (1 - balance) * F.cosine_similarity(p, t, dim=-1).mean()


def test_interaction_is_parameter_free_and_matches_its_definition():
    from rsitr.retrieval import interaction

    assert not any(isinstance(v, torch.nn.Module) and list(v.parameters()) for v in vars(interaction).values())
    _, _, it, im, tt, tm = _toy()
    s = fine_scores(it, im, tt, tm)
    assert s.shape == (12, 20) and torch.isfinite(s).all()
    for i, j in [(0, 0), (3, 7), (11, 19)]:
        assert s[i, j].item() == pytest.approx(_brute(it[i], im[i], tt[j], tm[j]).item(), abs=1e-5)
    # chunking and the paired form give the same numbers
    assert torch.allclose(s, fine_scores(it, im, tt, tm, chunk=1), atol=1e-6)
    assert torch.allclose(s, fine_scores_paired(it[:, None], im[:, None], tt[None], tm[None]), atol=1e-6)
    # the balance endpoints are the two directions
    a = fine_scores(it, im, tt, tm, balance=1.0)
    b = fine_scores(it, im, tt, tm, balance=0.0)
    assert torch.allclose(s, 0.5 * (a + b), atol=1e-6)
    with pytest.raises(ValueError):
        interaction_scores(it, im, tt, tm, tau=0.0)


def test_interaction_is_permutation_invariant_over_patches_and_words():
    _, _, it, im, tt, tm = _toy(seed=3)
    s = fine_scores(it, im, tt, tm)
    g = torch.Generator().manual_seed(9)
    pp, pw = torch.randperm(it.shape[1], generator=g), torch.randperm(tt.shape[1], generator=g)
    for renorm in (True, False):
        ref = fine_scores(it, im, tt, tm, renorm=renorm)
        assert torch.allclose(ref, fine_scores(it[:, pp], im[:, pp], tt, tm, renorm=renorm), atol=1e-6)
        assert torch.allclose(ref, fine_scores(it, im, tt[:, pw], tm[:, pw], renorm=renorm), atol=1e-6)
    # masked patches do not count, whatever they hold
    it2 = it.clone()
    it2[~im] = 100 * torch.randn(int((~im).sum()), it.shape[2])
    assert torch.allclose(s, fine_scores(it2, im, tt, tm), atol=1e-6)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_two_stage_with_all_candidates_equals_exhaustive(direction):
    ci, ct, it, im, tt, tm = _toy()
    ref = exhaustive(ci, ct, it, im, tt, tm, alpha=0.4)
    k = 12 if direction == "t2i" else 20
    got = two_stage(ci, ct, it, im, tt, tm, k=k, alpha=0.4, direction=direction, block=500)
    assert torch.allclose(got, ref, atol=1e-6)
    dim = 0 if direction == "t2i" else 1
    assert torch.equal(got.argsort(dim=dim, descending=True), ref.argsort(dim=dim, descending=True))
    # alpha 0 is the coarse ranking
    c = F.normalize(ci, dim=-1) @ F.normalize(ct, dim=-1).t()
    assert torch.allclose(two_stage(ci, ct, it, im, tt, tm, k=k, alpha=0.0, direction=direction), c, atol=1e-6)


def test_two_stage_top_k_candidates_are_the_coarse_top_k():
    ci, ct, it, im, tt, tm = _toy()
    c = F.normalize(ci, dim=-1) @ F.normalize(ct, dim=-1).t()
    ref = exhaustive(ci, ct, it, im, tt, tm)
    for kind in ("flat", "hnsw"):
        got = two_stage(ci, ct, it, im, tt, tm, k=4, direction="t2i", index_kind=kind)
        top = c.topk(4, dim=0).indices
        for j in range(ct.shape[0]):
            cand = set(top[:, j].tolist())
            assert set(got[:, j].topk(4).indices.tolist()) == cand
            rest = [i for i in range(ci.shape[0]) if i not in cand]
            assert torch.allclose(got[rest, j], c[rest, j] - OFFSET)  # below every candidate, coarse order
            assert torch.allclose(got[list(cand), j], ref[list(cand), j], atol=1e-6)
    got = two_stage(ci, ct, it, im, tt, tm, k=3, direction="i2t")
    top = c.topk(3, dim=1).indices
    assert all(set(got[i].topk(3).indices.tolist()) == set(top[i].tolist()) for i in range(ci.shape[0]))


def test_search_t2i_over_index_and_token_store(tmp_path):
    from rsitr.retrieval.index import TokenStore, VectorIndex

    ci, ct, it, im, tt, tm = _toy()
    ix = VectorIndex(ci.shape[1])
    ix.add(ci.numpy())
    st = TokenStore()
    st.append(it, im)
    st.save(tmp_path / "tok")
    st = TokenStore.load(tmp_path / "tok")
    scores, ids, parts = search_t2i(ix, st, ct[:5], tt[:5], tm[:5], k=12, top=6, alpha=0.5)
    ref = exhaustive(ci, ct[:5], it, im, tt[:5], tm[:5]).t()  # [5, 12]
    assert ids.shape == (5, 6)
    assert torch.equal(torch.from_numpy(ids), ref.topk(6, dim=1).indices)
    assert torch.allclose(torch.from_numpy(scores), ref.topk(6, dim=1).values, atol=2e-3)  # fp16 tokens


def test_ftf_loss_terms_and_gradients():
    from rsitr.methods.ftf import FTF
    from rsitr.models.base import Features
    from rsitr.models.clip import CLIP
    from rsitr.utils.errors import RsitrError

    bb = CLIP.from_config("tiny")
    g = torch.Generator().manual_seed(0)
    d = bb.embed_dim
    img = Features(torch.randn(6, d, generator=g, requires_grad=True), torch.randn(6, 9, d, generator=g, requires_grad=True),
                   torch.ones(6, 9, dtype=torch.bool))
    tm = torch.ones(6, 5, dtype=torch.bool)
    tm[:, 4] = False
    txt = Features(torch.randn(6, d, generator=g, requires_grad=True), torch.randn(6, 5, d, generator=g, requires_grad=True), tm)
    for mode in ("granularity", "structure", "none"):
        m = FTF(bb, {"intra_mode": mode}, None)
        loss, logs = m.loss(bb, img, txt, {})
        assert torch.isfinite(loss) and {"loss_coarse", "loss_fine"} <= set(logs) and ("loss_intra" in logs) == (mode != "none")
        img.tokens.grad = None
        loss.backward()
        assert torch.isfinite(img.tokens.grad).all() and img.tokens.grad.abs().sum() > 0
    assert not list(FTF(bb, {}, None).parameters())  # CLIP has its own temperature: FTF adds nothing
    with pytest.raises(RsitrError, match="unknown FTF option"):
        FTF(bb, {"alhpa": 0.3}, None)


@pytest.fixture(scope="module")
def synth(synth_dataset) -> Path:
    return synth_dataset(n_images=20, seed=3, image_size=32)


def test_ftf_trains_evaluates_and_reloads(synth, tmp_path):
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset, evaluate
    from rsitr.methods.factory import load
    from rsitr.retrieval.metrics import retrieval_metrics
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    out = tmp_path / "run"
    cfg = TrainConfig().override({
        "data.path": str(synth), "out_dir": str(out), "model.backbone": "clip:tiny", "model.mode": "full",
        "epochs": 1, "max_steps": 1, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 64, "seed": 1,
        "augment.enabled": False, "method.name": "ftf", "method.options": {"k": 3, "alpha": 0.5},
    })
    res = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for h in res.history for k, v in h.items() if k.startswith("loss"))
    assert res.test is not None and 0 <= res.test["mR"] <= 100
    loaded = load(str(out))
    model, method = loaded.backbone, loaded.method
    assert method.name == "ftf" and method.options["k"] == 3 and method.capabilities.two_stage
    test = load_dataset(str(synth)).split("test")
    m = evaluate(model, test, method=method, progress=False)
    assert m["mR"] == pytest.approx(res.test["mR"])
    # the two-stage matrix ranks exactly like exhaustive scoring on the 3 candidates of each caption
    enc = encode_dataset(model, test, keep_tokens=True, progress=False)
    t2i, i2t = method.similarity_pair(model, enc)
    assert t2i.shape == i2t.shape == (len(test), len(enc.text_to_image))
    method.opts.rerank = "exhaustive"
    ex = method.similarity(model, enc)
    top = t2i.topk(3, dim=0)
    assert torch.allclose(top.values, ex.gather(0, top.indices), atol=1e-5)
    method.opts.rerank = "none"
    coarse = retrieval_metrics(method.similarity(model, enc), enc.text_to_image)
    assert coarse["t2i_r10"] == pytest.approx(retrieval_metrics(t2i, enc.text_to_image)["t2i_r10"])  # k=3 < 10: same sets
    # the benchmark on this checkpoint and split: all stages, recall columns filled, JSON written
    from rsitr.cli import main

    assert main(["-q", "bench", "ftf", "--checkpoint", str(out), "--data", str(synth), "--ks", "2,50", "--out", str(tmp_path / "b.json")]) == 0
    import json

    res_b = json.loads((tmp_path / "b.json").read_text())
    stages = [r["stage"] for r in res_b["rows"]]
    n_test = len(test)
    assert stages == ["coarse", "two-stage K=2", f"two-stage K={n_test}", "exhaustive"]
    rows = {r["stage"]: r for r in res_b["rows"]}
    # K = all images ranks like exhaustive scoring (fp16 tokens in the store: allow a tie flip)
    assert abs(rows[f"two-stage K={n_test}"]["mR_t2i"] - rows["exhaustive"]["mR_t2i"]) < 10
    assert (tmp_path / "b.md").read_text().startswith("FTF text->image")


def test_bench_synthetic_archive_latency_only(tmp_path, capsys):
    from rsitr.cli import main

    assert main(["-q", "bench", "ftf", "--synthetic-archive", "300", "--tokens", "5", "--dim", "16", "--queries", "4", "--exhaustive-queries", "2",
                 "--ks", "10,20", "--index", "hnsw", "--json"]) == 0
    import json

    res = json.loads(capsys.readouterr().out)
    assert res["setup"]["images"] == 300 and not res["setup"]["recall_meaningful"]
    assert [r["queries"] for r in res["rows"]] == [4, 4, 4, 2]
    assert all(r["mR_t2i"] is None and r["p50_ms"] > 0 for r in res["rows"])


def test_bench_ftf_recall_index_auto_is_what_index_build_auto_picks(tmp_path, capsys):
    from rsitr.cli import main

    out = tmp_path / "auto.json"
    assert main(["-q", "bench", "ftf", "--synthetic-archive", "300", "--tokens", "5", "--dim", "16", "--queries", "3", "--exhaustive-queries", "0",
                 "--ks", "10", "--index", "auto", "--out", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    auto = res["setup"]["index_auto"]
    assert res["setup"]["index"] == "auto" and auto["kind"] == "flat" and "< 50000" in auto["why"]  # 300 vectors: exact search
    assert "index auto = flat" in capsys.readouterr().out and [r["stage"] for r in res["rows"]] == ["coarse", "two-stage K=10"]


def test_synthetic_archive_clustered_puts_images_and_queries_in_groups():
    from rsitr.bench.ftf import synthetic_archive_inputs
    from rsitr.utils.errors import RsitrError

    def nearest(pooled, q):  # mean cosine of each query to its nearest image
        return float((q @ pooled.T).max(1).mean())

    _, rp, rq, rt, _ = synthetic_archive_inputs(1000, 49, 32, queries=20)
    store, cp, cq, ct, _ = synthetic_archive_inputs(1000, 49, 32, queries=20, data="clustered")
    assert store.tokens.shape == (1000, 49, 32) and cp.shape == (1000, 32) and ct.shape == (20, 16, 32)
    # grouped: every query has images close to it (noise 0.35 around a shared centre); random: none has
    assert nearest(cp, cq) > 0.8 and nearest(rp, rq) < 0.65
    with pytest.raises(RsitrError, match="clustered"):
        synthetic_archive_inputs(10, 2, 8, data="grid")


def test_plain_scores_fast_path_matches_the_definition():
    """``renorm=False`` goes through one big cosine matrix; same values as the per-pair block."""
    from rsitr.retrieval.interaction import fine_scores, interaction_scores

    g = torch.Generator().manual_seed(3)
    p, w = torch.randn(7, 9, 16, generator=g), torch.randn(5, 6, 16, generator=g)
    mp, mw = torch.rand(7, 9, generator=g) > 0.2, torch.rand(5, 6, generator=g) > 0.3
    mp[:, 0] = mw[:, 0] = True
    for balance in (0.0, 0.5, 1.0):
        ref = torch.stack([torch.stack([interaction_scores(p[i], mp[i], w[j], mw[j], renorm=False, balance=balance) for j in range(5)])
                           for i in range(7)])
        for chunk in (1, 50, 1 << 22):  # text blocks of 1, a few, all
            got = fine_scores(p, mp, w, mw, renorm=False, balance=balance, chunk=chunk)
            assert torch.allclose(got, ref, atol=1e-6)


def test_candidate_fine_loss_equals_full_loss_when_every_item_is_a_candidate():
    from rsitr.methods.ftf import candidate_fine_ce, symmetric_ce
    from rsitr.models.base import Features
    from rsitr.retrieval.interaction import fine_scores

    g = torch.Generator().manual_seed(5)
    n = 6
    img = Features(torch.randn(n, 8, generator=g), torch.randn(n, 5, 8, generator=g), torch.ones(n, 5, dtype=torch.bool))
    mask = torch.rand(n, 4, generator=g) > 0.3
    mask[:, 0] = True
    txt = Features(torch.randn(n, 8, generator=g), torch.randn(n, 4, 8, generator=g), mask)
    scale = torch.tensor(10.0)
    full = symmetric_ce(scale * fine_scores(img.tokens, img.mask, txt.tokens, txt.mask))
    assert torch.allclose(candidate_fine_ce(img, txt, n, scale), full, atol=1e-5)
    # fewer candidates: a different (smaller-support) loss, finite, with gradients into the tokens
    img.tokens.requires_grad_(True)
    part = candidate_fine_ce(img, txt, 3, scale)
    part.backward()
    assert torch.isfinite(part) and img.tokens.grad is not None and img.tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
def test_fast_candidate_loss_matches_the_interaction_definition(renorm, balance):
    """The training loss built from one batch-wide cosine matrix equals the loss computed through
    ``interaction_scores`` on gathered candidate tokens, value and gradients."""
    from rsitr.methods.ftf import candidate_fine_ce, candidate_fine_ce_reference
    from rsitr.models.base import Features

    g = torch.Generator().manual_seed(11)
    n = 9
    pm = torch.rand(n, 6, generator=g) > 0.2
    wm = torch.rand(n, 5, generator=g) > 0.3
    pm[:, 0] = wm[:, 0] = True
    grads = []
    vals = []
    for fn in (candidate_fine_ce, candidate_fine_ce_reference):
        g2 = torch.Generator().manual_seed(12)
        it = torch.randn(n, 6, 8, generator=g2, requires_grad=True)
        tt = torch.randn(n, 5, 8, generator=g2, requires_grad=True)
        img = Features(torch.randn(n, 8, generator=g2), it, pm)
        txt = Features(torch.randn(n, 8, generator=g2), tt, wm)
        loss = fn(img, txt, 4, torch.tensor(7.0), tau=0.1, balance=balance, renorm=renorm)
        loss.backward()
        vals.append(loss.detach())
        grads.append((it.grad, tt.grad))
    assert torch.allclose(vals[0], vals[1], atol=1e-5)
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5) and torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
