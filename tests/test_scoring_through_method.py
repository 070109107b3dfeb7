"""Search, evaluation and benchmarks score through the method a checkpoint was trained with: an FTF
checkpoint trained with non-default alpha / tau / balance ranks the same candidates identically in
`rsitr search --rerank ftf` and in `rsitr eval`'s two-stage matrix."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("faiss")

ALPHA, TAU, BALANCE, K = 0.2, 0.03, 0.8, 4


def _tiny_run(root, *, n_images: int, data_seed: int, seed: int, method: str, options: dict):
    """A synthetic dataset under ``root`` and a one-step tiny-CLIP run of ``method`` on it."""
    from rsitr.data.synth import write_synth
    from rsitr.train.config import TrainConfig
    from rsitr.train.loop import train

    ann = write_synth(root / "synth", n_images=n_images, seed=data_seed, image_size=32)
    run = root / "run"
    train(TrainConfig().override({
        "data.path": str(ann), "out_dir": str(run), "model.backbone": "clip:tiny", "model.mode": "full", "epochs": 1, "max_steps": 1,
        "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 64, "seed": seed, "augment.enabled": False,
        "method.name": method, "method.options": options,
    }), progress=False, evaluate_test=False)
    return ann, run


@pytest.fixture(scope="module")
def ftf_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("ftf_scoring"), n_images=24, data_seed=2, seed=3, method="ftf",
                     options={"alpha": ALPHA, "tau": TAU, "balance": BALANCE, "k": K})


def test_search_ranks_like_eval_with_the_trained_ftf_parameters(ftf_run, tmp_path, capsys):
    from rsitr.cli import main
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import similarity
    from rsitr.methods.factory import load

    ann, run = ftf_run
    loaded = load(str(run))
    params = loaded.method.two_stage_params()
    assert (params.alpha, params.tau, params.balance, params.k) == (ALPHA, TAU, BALANCE, K)
    test = load_dataset(str(ann)).split("test")
    # what `rsitr eval` ranks texts->images by: the method's t2i two-stage matrix
    (t2i, _i2t), _ = similarity(loaded.backbone, test, method=loaded.method, per_direction=True, progress=False)

    # an index over exactly the test images, with the checkpoint, token store kept
    src = tmp_path / "tiles"
    src.mkdir()
    for e in test.entries:
        shutil.copy(e.path, src / f"{len(list(src.iterdir())):03d}.png")
    index = tmp_path / "index"
    assert main(["-q", "index", "build", str(src), "--checkpoint", str(run), "--out", str(index), "--keep-tokens", "--batch-size", "4"]) == 0
    capsys.readouterr()

    texts, _ = test.texts()
    for j in range(0, len(texts), max(1, len(texts) // 6)):
        assert main(["-q", "search", str(index), texts[j], "-k", str(K), "--rerank", "ftf", "--rerank-depth", str(K), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["results"]
        ids = [int(r["path"].rsplit("/", 1)[-1][:3]) for r in got]
        scores = torch.tensor([r["score"] for r in got])
        want = t2i[:, j].topk(K)
        assert sorted(ids) == sorted(want.indices.tolist())  # the same candidates ...
        # ... in the same order, with the same scores (the index keeps fp16 tokens: a near-tie may swap)
        assert torch.allclose(scores, want.values.float(), atol=5e-3)
        for a, b, s in zip(ids, want.indices.tolist(), want.values.tolist()):
            assert a == b or abs(float(t2i[a, j]) - s) < 5e-3


def test_default_parameters_would_rank_differently(ftf_run):
    """The check above can fail: the library defaults give other scores on this checkpoint."""
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.retrieval.twostage import TwoStageParams, two_stage

    from rsitr.methods.factory import load

    ann, run = ftf_run
    loaded = load(str(run))
    enc = encode_dataset(loaded.backbone, load_dataset(str(ann)).split("test"), keep_tokens=True, progress=False)
    args = (enc.images, enc.texts, enc.image_features.tokens, enc.image_features.mask, enc.text_features.tokens, enc.text_features.mask)
    d = TwoStageParams()
    trained = loaded.method.score(loaded.backbone, enc)
    default = two_stage(*args, k=K, alpha=d.alpha, tau=d.tau, balance=d.balance)
    cand = trained > -2  # the reranked cells (the others keep coarse - 4)
    assert not torch.allclose(trained[cand], default[cand], atol=5e-3)


def test_eval_command_scores_a_two_stage_checkpoint_as_the_bench_does(ftf_run, capsys):
    """`rsitr eval` (its default `--rerank none`) gives a two-stage checkpoint the number the bench's
    cells and `rsitr models evaluate` give: each direction ranked by its own two-stage matrix (the
    candidate sets depend on the query direction). It used to rank image->text by the text->image
    matrix: on RSICD a combination checkpoint scored 23.93 in `rsitr eval` and 24.23 in its cell."""
    from rsitr.cli import main
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import evaluate_ties, pair_metrics, similarity
    from rsitr.methods.factory import load

    ann, run = ftf_run
    loaded = load(str(run))
    split = load_dataset(str(ann)).split("train")  # 16 images: more than the K=4 candidates
    (t2i, i2t), owner = similarity(loaded.backbone, split, method=loaded.method, per_direction=True, progress=False)
    # the check can fail: here the two directions' matrices rank image->text differently
    assert pair_metrics(t2i, owner) != pair_metrics((t2i, i2t), owner)
    cells = evaluate_ties(loaded.backbone, split, method=loaded.method, progress=False)  # what a bench cell scores
    for ties in ("expected", "optimistic", "pessimistic"):
        assert main(["-q", "eval", "--data", str(ann), "--checkpoint", str(run), "--split", "train", "--ties", ties, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert {k: got[k] for k in cells[ties]} == pytest.approx(cells[ties], abs=1e-9), ties


def test_test_time_scores_a_reranking_method_through_its_reranker(tmp_path):
    """The ``test_time`` measurement (and ``rsitr models evaluate``) score a checkpoint whose method
    re-ranks at test time (iEBAKER's SAR) as its bench cell does: the plain row is the method's own
    score, the TTA row the same scoring over the averaged embeddings, and no QB-Norm rows (a
    cosine-only option). They used to score such a checkpoint by the plain cosine, so an iEBAKER
    cell's test-time "plain" column was not its test mR."""
    from rsitr.bench.release import EvalSet, evaluate_model
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset, evaluate_ties, pair_metrics
    from rsitr.methods.factory import load

    ann, run = _tiny_run(tmp_path, n_images=40, data_seed=5, seed=1, method="iebaker", options={"sar": True, "sar_k": 3})
    loaded = load(str(run))
    assert loaded.method.capabilities.reranker == "sar" and not loaded.method.capabilities.cosine
    split = load_dataset(str(ann)).split("train")
    rows = evaluate_model(str(run), [EvalSet("s", str(ann), split="train", bank="val")], ttas=(1, 8), engine="torch", progress=False)
    assert [(r["tta"], r["rerank"]) for r in rows] == [(1, "none"), (8, "none")]  # no QB-Norm rows
    for r in rows:
        own = evaluate_ties(loaded.backbone, split, method=loaded.method, ties=("expected",), tta=r["tta"], progress=False)["expected"]
        assert r["mR"] == pytest.approx(own["mR"], abs=1e-9)
        # the check can fail: SAR ranks differently from the cosine here
        enc = encode_dataset(loaded.backbone, split, tta=r["tta"], progress=False)
        assert pair_metrics(enc.images @ enc.texts.t(), enc.text_to_image)["mR"] != pytest.approx(r["mR"], abs=1e-6)
