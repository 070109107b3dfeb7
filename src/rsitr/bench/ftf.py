"""FTF speed/accuracy benchmark: coarse recall vs two-stage rerank vs exhaustive fine scoring.

Text -> image retrieval over one index (``rsitr bench ftf``):

* ``coarse``: the recall stage alone (FAISS search of the pooled embeddings, top 10);
* ``two-stage K``: recall ``K`` candidates, rerank them with the parameter-free interaction on
  their stored patch tokens (:func:`rsitr.retrieval.twostage.search_t2i`), for each ``K`` of
  ``--ks`` (default 50,100,200);
* ``exhaustive``: every image scored with ``(1 - alpha) * coarse + alpha * fine`` (the
  interaction over the whole archive, in blocks).

Accuracy: R@1/5/10 of text->image and their mean ``mR(t2i)`` (percent; the one image of each
caption among the top K). Latency: per query (one query at a time, as a search engine serves
them), p50/p95 in ms, all measured in the same run; ``speed-up`` = exhaustive p50 / that row's
p50. Exhaustive scoring can be slow on a large archive: ``--exhaustive-queries`` measures it on
the first queries only (the table says how many).

Inputs: a checkpoint (or backbone spec) + a caption dataset split (``--checkpoint``, ``--data``,
``--split``), or ``--synthetic-archive N``: N synthetic images (``--tokens`` fp16 tokens of
``--dim`` dims each, pooled = normalised token mean) and queries, random or in groups
(``--synthetic-data clustered``, :func:`synthetic_archive_inputs`) - latency only, recall is
meaningless there (shown as "-"). ``--index auto``: the recall index ``index build --index-kind
auto`` would build over the pooled vectors, its record in the result.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rsitr.bench.measurements import write_result
from rsitr.retrieval.index import TokenStore, VectorIndex, l2_normalize
from rsitr.retrieval.interaction import DEFAULT_BALANCE, DEFAULT_TAU, fine_scores
from rsitr.retrieval.twostage import DEFAULT_ALPHA, TwoStageParams, search_t2i
from rsitr.utils.errors import RsitrError

log = logging.getLogger(__name__)

DEFAULT_KS = (50, 100, 200)
SYNTHETIC_DATA = ("random", "clustered")
CLUSTER_TOKEN_NOISE = 2.45  # per-dimension token noise of a clustered archive: the mean of 49 tokens has noise ~0.35
TOP = 10  # deepest rank the recalls need


def _pct(lat: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(lat) * 1000.0, q)) if lat else float("nan")


def _recalls(ranked: np.ndarray, truth: Sequence[int] | None) -> dict[str, float | None]:
    if truth is None:
        return {"t2i_r1": None, "t2i_r5": None, "t2i_r10": None, "mR_t2i": None}
    t = np.asarray(truth)[: ranked.shape[0], None]
    out = {f"t2i_r{k}": float(100.0 * (ranked[:, :k] == t).any(1).mean()) for k in (1, 5, 10)}
    out["mR_t2i"] = float(np.mean([out["t2i_r1"], out["t2i_r5"], out["t2i_r10"]]))
    return out


def exhaustive_search(image_pooled: np.ndarray, store: TokenStore, q_pooled: np.ndarray, q_tokens: torch.Tensor, q_mask: torch.Tensor,
                      *, top: int = TOP, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU, balance: float = DEFAULT_BALANCE,
                      block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """One query against every image: combined score over the whole archive (images read from
    the store ``block`` at a time). Returns ``(scores [top], ids [top])``."""
    n = len(store)
    coarse = image_pooled @ l2_normalize(q_pooled.reshape(1, -1).astype(np.float32))[0]
    fine = np.empty(n, np.float32)
    toks, mask = store.tokens, store.mask
    for s in range(0, n, block):
        t = torch.from_numpy(np.asarray(toks[s : s + block], dtype=np.float32))
        m = torch.from_numpy(np.asarray(mask[s : s + block]))
        fine[s : s + block] = fine_scores(t, m, q_tokens[None], q_mask[None], tau=tau, balance=balance, normalize=False)[:, 0].numpy()
    final = (1 - alpha) * coarse + alpha * fine
    k = min(top, n)
    part = np.argpartition(-final, k - 1)[:k]
    order = part[np.argsort(-final[part], kind="stable")]
    return final[order], order


def run(index: VectorIndex, store: TokenStore, q_pooled: np.ndarray, q_tokens: torch.Tensor, q_mask: torch.Tensor | None, *,
        truth: Sequence[int] | None = None, ks: Sequence[int] = DEFAULT_KS, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU,
        balance: float = DEFAULT_BALANCE, exhaustive_queries: int | None = None, image_pooled: np.ndarray | None = None,
        warmup: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every stage on the same queries (one at a time). ``truth[j]`` is the index of query
    ``j``'s image (None: latency only). Returns one row per stage."""
    from rsitr.utils.progress import progress_bar

    q_pooled = np.asarray(q_pooled, np.float32)
    nq = q_pooled.shape[0]
    q_tokens = q_tokens.float()
    q_mask = torch.ones(q_tokens.shape[:2], dtype=torch.bool) if q_mask is None else q_mask.bool()
    n_img = len(index)
    if len(store) != n_img:
        raise RsitrError(f"index has {n_img} images but the token store {len(store)}")
    rows: list[dict[str, Any]] = []

    def measure(name: str, k: int | None, fn, n: int, warm: int = warmup) -> None:
        for j in range(min(warm, n)):
            fn(j)
        lat, ranked = [], []
        for j in progress_bar(range(n), desc=name, disable=not progress, leave=False):
            t0 = time.perf_counter()
            ids = fn(j)
            lat.append(time.perf_counter() - t0)
            ranked.append(np.pad(ids[:TOP], (0, TOP - len(ids[:TOP])), constant_values=-1))
        row = {"stage": name, "k": k, "queries": n, "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "mean_ms": float(np.mean(lat) * 1000)}
        row.update(_recalls(np.stack(ranked), truth))
        rows.append(row)
        log.info("%s: p50 %.2f ms, p95 %.2f ms over %d queries", name, row["p50_ms"], row["p95_ms"], n)

    measure("coarse", None, lambda j: index.search(q_pooled[j : j + 1], TOP)[1][0], nq)
    for k in ks:
        kk = min(int(k), n_img)

        def two(j, kk=kk):
            return search_t2i(index, store, q_pooled[j : j + 1], q_tokens[j : j + 1], q_mask[j : j + 1], k=kk, top=TOP,
                              alpha=alpha, tau=tau, balance=balance)[1][0]

        measure(f"two-stage K={kk}", kk, two, nq)
    if exhaustive_queries != 0:
        pooled = l2_normalize(index.reconstruct_all()) if image_pooled is None else l2_normalize(np.asarray(image_pooled, np.float32))
        ne = nq if exhaustive_queries is None else min(int(exhaustive_queries), nq)
        measure("exhaustive", n_img, lambda j: exhaustive_search(pooled, store, q_pooled[j], q_tokens[j], q_mask[j], alpha=alpha,
                                                                 tau=tau, balance=balance)[1], ne, min(warmup, 1))
        ex = rows[-1]["p50_ms"]
        for r in rows:
            r["speedup_vs_exhaustive"] = float(ex / r["p50_ms"]) if r["p50_ms"] > 0 else None
    return rows


# -- inputs --------------------------------------------------------------------------------------
def synthetic_archive_inputs(n: int, tokens: int, dim: int, *, queries: int = 50, words: int = 16, seed: int = 0, block: int = 8192,
                             data: str = "random"):
    """Synthetic archive: fp16 unit tokens ``[n, tokens, dim]``, pooled = normalised token mean,
    and queries. ``data="random"``: i.i.d. Gaussian tokens and queries (no structure: the worst
    case for an approximate recall index). ``"clustered"``: the images fall in ``n // 100``
    groups (Gaussian centres, as ``rsitr bench search --data clustered``); every token of an image
    and every word of a query is its group's centre plus Gaussian noise of
    :data:`CLUSTER_TOKEN_NOISE` per dimension, so a pooled vector sits at the noise level of that
    benchmark's vectors (0.35) and a query's words come from one random group. Returns
    ``(store, image_pooled, q_pooled, q_tokens, q_mask)``."""
    if data not in SYNTHETIC_DATA:
        raise RsitrError(f"synthetic archive data must be one of {SYNTHETIC_DATA}, got {data!r}")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32) if data == "clustered" else None
    toks = np.empty((n, tokens, dim), np.float16)
    pooled = np.empty((n, dim), np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = rng.standard_normal((m, tokens, dim), dtype=np.float32)
        if centres is not None:
            x = centres[rng.integers(0, len(centres), m)][:, None, :] + CLUSTER_TOKEN_NOISE * x
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        toks[s : s + m] = x
        pooled[s : s + m] = l2_normalize(x.mean(1))
    store = TokenStore.from_arrays(toks, np.ones((n, tokens), bool))
    q = rng.standard_normal((queries, words, dim), dtype=np.float32)
    if centres is not None:
        q = centres[rng.integers(0, len(centres), queries)][:, None, :] + CLUSTER_TOKEN_NOISE * q
    qt = F.normalize(torch.from_numpy(q), dim=-1)
    qm = torch.ones(queries, words, dtype=torch.bool)
    qp = l2_normalize(qt.mean(1).numpy())
    return store, pooled, qp, qt, qm


def build_index(pooled: np.ndarray, kind: str = "flat", **kwargs) -> tuple[VectorIndex, float]:
    t0 = time.perf_counter()
    ix = VectorIndex(pooled.shape[1], kind, **kwargs)
    ix.add(pooled)
    return ix, time.perf_counter() - t0


def dataset_inputs(checkpoint: str, data: str, split: str, *, batch_size: int = 128, progress: bool = True, top_n: int | None = None):
    """Encode a caption split with a checkpoint: ``(store, image_pooled, q_pooled, q_tokens, q_mask,
    truth, params)``, ``params`` the two-stage parameters of the checkpoint's method (the library
    defaults when it has no two-stage scoring)."""
    from rsitr.data.captions import load_dataset
    from rsitr.eval.evaluate import encode_dataset
    from rsitr.methods.factory import load

    loaded = load(checkpoint)
    model = loaded.backbone
    ds = load_dataset(data).split(split)
    if len(ds) == 0:
        raise RsitrError(f"{data}: the {split!r} split is empty")
    enc = encode_dataset(model, ds, keep_tokens=True, batch_size=batch_size, progress=progress)
    store = TokenStore(top_n=top_n)
    store.append(enc.image_features.tokens, enc.image_features.mask, pooled=enc.image_features.pooled)
    params = (loaded.method.two_stage_params() if loaded.method is not None else None) or TwoStageParams()
    tf = enc.text_features
    return store, enc.images.numpy(), enc.texts.numpy(), F.normalize(tf.tokens.float(), dim=-1), tf.mask, list(enc.text_to_image), params


# -- report ----------------------------------------------------------------------------------------
def format_markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    auto = s.get("index_auto")
    index = s["index"] if not auto else (f"auto = {auto['kind']} {' '.join(f'{a}={b}' for a, b in auto['params'].items())} "
                                         f"(tuned R@10 {auto['recall@10']:.3f})")
    lines = [f"FTF text->image: {s['source']}, {s['images']:,} images, {s['queries']} queries, index {index} "
             f"(built in {s['index_build_s']:.1f}s), alpha {s['alpha']}, tau {s['tau']}, balance {s['balance']}, "
             f"{s['threads']} threads", ""]
    if not s["recall_meaningful"]:
        lines += ["Synthetic archive: latency only, recall is not meaningful (shown as -).", ""]
    lines += ["| stage | K | queries | R@1 | R@5 | R@10 | mR(t2i) | p50 ms | p95 ms | speed-up vs exhaustive |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {r['k'] if r['k'] is not None else '-'} | {r['queries']} | {f(r['t2i_r1'])} | {f(r['t2i_r5'])} | "
                     f"{f(r['t2i_r10'])} | {f(r['mR_t2i'])} | {f(r['p50_ms'])} | {f(r['p95_ms'])} | "
                     f"{f(r.get('speedup_vs_exhaustive'), 1) + 'x' if r.get('speedup_vs_exhaustive') else '-'} |")
    ex = [r for r in result["rows"] if r["stage"] == "exhaustive"]
    if ex and ex[0]["queries"] < s["queries"]:
        lines += ["", f"Exhaustive scoring measured on the first {ex[0]['queries']} of the {s['queries']} queries "
                      f"(its recall columns cover those queries only)."]
    return "\n".join(lines)


def measure(*, checkpoint: str | None = None, data: str | None = None, split: str = "test", synthetic_archive: int | None = None,
            tokens: int = 49, dim: int = 256, words: int = 16, queries: int = 50, exhaustive_queries: int | None = None,
            ks: Sequence[int] = DEFAULT_KS, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
            alpha: float | None = None, tau: float | None = None, balance: float | None = None, top_n: int | None = None,
            threads: int | None = None, seed: int = 0, out: str | Path | None = None, synthetic_data: str = "random") -> dict[str, Any]:
    """The whole measurement of ``rsitr bench ftf``: inputs (a checkpoint on a caption split, or a
    synthetic random archive), the recall index, every stage; ``alpha``/``tau``/``balance``
    default to the checkpoint method's two-stage parameters. Returns ``{"setup", "rows"}`` (also
    written to ``out`` as JSON, and markdown next to it)."""
    if threads:
        torch.set_num_threads(int(threads))
        try:
            from rsitr.retrieval.index import load_faiss

            faiss = load_faiss()
            faiss.omp_set_num_threads(int(threads))
        except (ImportError, RsitrError):
            pass
    if not ks or min(ks) < 1:
        raise RsitrError(f"--ks must list positive integers, got {list(ks)!r}")
    params = TwoStageParams()
    truth = None
    t0 = time.perf_counter()
    if synthetic_archive:
        store, pooled, qp, qt, qm = synthetic_archive_inputs(int(synthetic_archive), tokens, dim, queries=max(1, queries or 50),
                                                            words=words, seed=seed, data=synthetic_data)
        source = f"synthetic {synthetic_data} archive ({tokens} fp16 tokens x {dim} dims per image)"
        exq = 5 if exhaustive_queries is None else exhaustive_queries
    else:
        if not checkpoint or not data:
            raise RsitrError("rsitr bench ftf needs --checkpoint and --data, or --synthetic-archive N")
        store, pooled, qp, qt, qm, truth, params = dataset_inputs(checkpoint, data, split, top_n=top_n)
        if queries:
            qp, qt, qm, truth = qp[:queries], qt[:queries], qm[:queries], truth[:queries]
        source = f"{data} [{split}] with {checkpoint}"
        exq = exhaustive_queries
    prep = time.perf_counter() - t0
    alpha = alpha if alpha is not None else params.alpha
    tau = tau if tau is not None else params.tau
    balance = balance if balance is not None else params.balance
    auto = None
    if index == "auto":  # what `rsitr index build --index-kind auto` would build over these vectors
        from rsitr.retrieval.autoindex import auto_index

        vindex, auto = auto_index(l2_normalize(np.asarray(pooled, np.float32)))
        vindex.normalize, build_s = True, auto["seconds"]
    else:
        kw = {"nlist": nlist, "nprobe": nprobe} if index == "ivf" else {}
        vindex, build_s = build_index(pooled, index, **kw)
    rows = run(vindex, store, qp, qt, qm, truth=truth, ks=ks, alpha=alpha, tau=tau, balance=balance, exhaustive_queries=exq,
               image_pooled=pooled)
    result = {
        "setup": {"source": source, "images": len(store), "queries": int(qp.shape[0]), "index": index, "index_build_s": build_s,
                  "prepare_s": prep, "alpha": alpha, "tau": tau, "balance": balance, "threads": torch.get_num_threads(),
                  "tokens_per_image": int(store.tokens.shape[1]), "dim": int(store.tokens.shape[2]),
                  "recall_meaningful": truth is not None, "index_auto": auto, "machine": platform.machine(), "python": platform.python_version()},
        "rows": rows,
    }
    if out:
        write_result(out, result, format_markdown(result) + "\n")
    return result


# -- the measurement ---------------------------------------------------------------------------------
def _ftf_on_cell(ctx, params: dict[str, Any]) -> dict[str, Any]:
    """``ftf_speed`` on a finished cell: its checkpoint on its test split (``params``: the
    options of :func:`measure`, e.g. ``ks: [50, 100]``, ``queries: 50``)."""
    return measure(checkpoint=ctx.source, data=str(ctx.cfg.data.path), split=ctx.cfg.data.test_split, **params)


def _register() -> None:
    from rsitr.bench.measurements import Measurement, keyword_check, per_method, register_measurement

    # on a cell: the cell gives the checkpoint and data; the synthetic-archive options do not apply
    check = keyword_check("ftf_speed", measure, exclude=("checkpoint", "data", "split", "synthetic_archive", "tokens", "dim", "words", "out",
                                                         "synthetic_data"))
    register_measurement(Measurement("ftf_speed", "FTF: coarse vs two-stage vs exhaustive scoring", per_method(format_markdown), on_cell=_ftf_on_cell,
                                     run=measure, render_one=format_markdown, check=check))


_register()
