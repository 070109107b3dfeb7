"""Evaluation of a (backbone, method) on a dataset split: encode it, score it through the method,
and measure it with the field's protocol under every tie convention."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rsitr.data.types import CaptionDataset
from rsitr.models.base import Backbone, Features

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    images: torch.Tensor  # [N, D] L2-normalised
    texts: torch.Tensor  # [M, D] L2-normalised
    text_to_image: list[int]
    image_features: Features | None = None  # raw (not normalised) features with tokens, if asked
    text_features: Features | None = None


@torch.no_grad()
def encode_dataset(
    backbone: Backbone,
    dataset: CaptionDataset,
    *,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
    trunk_cache=None,
    progress: bool = True,
    keep_tokens: bool = False,
    engine=None,
    tta: int = 1,
) -> Encoded:
    """Embed every image (eval transform) and caption of ``dataset``.

    ``trunk_cache`` (a :class:`rsitr.data.imagesets.TrunkCache` built on this dataset) lets a
    backbone with frozen trunks skip the towers and apply only its heads. ``keep_tokens``
    also returns the token-level features (for methods that re-rank with them). ``engine`` (an
    :class:`rsitr.models.engine.InferenceEngine` of ``backbone``) runs the no-grad forward passes
    (ONNX Runtime); None runs the backbone in torch. ``tta`` (1, 4 or 8): each image's pooled
    embedding is the mean of its L2-normalised embeddings over that many dihedral views
    (:func:`rsitr.data.transforms.dihedral_views`; test-time augmentation, both directions of the
    protocol use it); token features, when kept, are those of the unrotated view (token positions
    do not rotate with a mean). A trunk cache holds one view only, so ``tta > 1`` encodes the images
    in full.
    """
    from rsitr.utils.progress import progress_bar

    from rsitr.data.transforms import EvalTransform
    from rsitr.models.tta import check_views, encode_views
    from rsitr.data.imagesets import ImageSet, iterate_images

    tta = check_views(tta)  # before the backbone's mode is touched
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    run = engine if engine is not None else backbone

    def keep(f: Features) -> Features:
        if keep_tokens:
            return Features(f.pooled.float().cpu(), f.tokens.float().cpu(), f.mask.cpu())
        return Features(f.pooled.float().cpu(), f.pooled.new_zeros(0), f.mask.new_zeros(0))

    def encode_px(px: torch.Tensor) -> Features:
        return keep(encode_views(run, px, tta, tokens=keep_tokens))

    if trunk_cache is not None and trunk_cache.image is not None and tta == 1:
        feats = trunk_cache.image[0]
        img_parts = [keep(backbone.image_head(_slice(feats, i, batch_size, device))) for i in range(0, len(dataset), batch_size)]
    else:
        images = ImageSet(dataset, EvalTransform(backbone.preprocess), train=False)
        img_parts = []
        it = iterate_images(images, range(len(dataset)), batch_size, workers)
        for px in progress_bar(it, total=math.ceil(len(dataset) / batch_size), desc="encode images", disable=not progress, leave=False):
            img_parts.append(encode_px(px.to(device)))
    texts, owner = dataset.texts()
    if trunk_cache is not None and trunk_cache.text is not None:
        feats = trunk_cache.text
        txt_parts = [keep(backbone.text_head(_slice(feats, i, batch_size, device))) for i in range(0, len(texts), batch_size)]
    else:
        txt_parts = []
        for i in progress_bar(range(0, len(texts), batch_size), desc="encode texts", disable=not progress, leave=False):
            ids = backbone.tokenize(texts[i : i + batch_size]).to(device)
            txt_parts.append(keep(run.text_features(ids)) if keep_tokens else keep(Features(run.encode_text(ids), ids.new_zeros(0), ids.new_zeros(0, dtype=torch.bool))))
    backbone.train(was_training)
    img_f, txt_f = _cat(img_parts, keep_tokens), _cat(txt_parts, keep_tokens)
    return Encoded(F.normalize(img_f.pooled, dim=-1), F.normalize(txt_f.pooled, dim=-1), owner,
                   img_f if keep_tokens else None, txt_f if keep_tokens else None)


def _cat(parts: list[Features], tokens: bool) -> Features:
    pooled = torch.cat([p.pooled for p in parts])
    if not tokens:
        return Features(pooled, pooled.new_zeros(0), torch.zeros(0, dtype=torch.bool))
    width = max(p.tokens.shape[1] for p in parts)  # text batches may differ in length (towers pad per batch)
    tok = torch.cat([F.pad(p.tokens, (0, 0, 0, width - p.tokens.shape[1])) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, width - p.mask.shape[1]), value=False) for p in parts])
    return Features(pooled, tok, mask)


def _slice(f, start: int, size: int, device):
    from rsitr.models.base import Features

    return Features(f.pooled[start : start + size].to(device), f.tokens[start : start + size].to(device).float(), f.mask[start : start + size].to(device))


def similarity(backbone: Backbone, dataset: CaptionDataset, method=None, per_direction: bool = False, **kwargs):
    """Image x text score matrix of a split: cosine of the pooled embeddings (``method`` None), or
    the method's own scoring (:meth:`~rsitr.methods.base.Method.similarity`; token features are
    encoded when its ``capabilities.score_tokens``). With ``per_direction``, the method's
    ``(t2i matrix, i2t matrix)`` pair when the two differ (two-stage scoring: the candidate sets
    depend on the query direction)."""
    needs_tokens = bool(method is not None and method.capabilities.score_tokens)
    enc = encode_dataset(backbone, dataset, keep_tokens=needs_tokens, **kwargs)
    if method is None:
        return enc.images @ enc.texts.t(), enc.text_to_image
    with torch.no_grad():
        was = method.training
        method.eval()
        if per_direction:
            t2i, i2t = method.similarity_pair(backbone, enc)
            sim = t2i if t2i is i2t else (t2i, i2t)
        else:
            sim = method.similarity(backbone, enc)
        method.train(was)
    return sim, enc.text_to_image


@dataclass
class QBNormBank:
    """QB-Norm at evaluation (:mod:`rsitr.retrieval.qbnorm`): ``bank``, a split that is not the
    evaluated one (the model's own training split), encoded like the evaluated split; ``beta``
    the inverse temperature of their Eq. 2; ``dynamic``: their Eq. 4. Or, instead of a split,
    ``texts``: caption embeddings already encoded by the model (``[B, D]``, L2-normalised: a
    shipped model's query bank), which normalise the text->image direction only (image->text
    keeps the plain cosine: a caption bank has no images)."""

    bank: CaptionDataset | None
    beta: float = 14.0
    dynamic: bool = False
    texts: torch.Tensor | None = None


def qbnorm_similarity(backbone: Backbone, dataset: CaptionDataset, qb: QBNormBank, **kwargs):
    """The ``(t2i, i2t)`` pair of the split's pooled-cosine matrix normalised by the bank: images by
    the bank's captions (text->image), captions by the bank's images (image->text); and the
    caption owners. ``kwargs`` go to :func:`encode_dataset` for both (``tta`` included)."""
    kwargs.pop("keep_tokens", None)
    if qb.texts is not None:  # a caption bank, encoded already: text->image only
        enc = encode_dataset(backbone, dataset, **kwargs)
        return qbnorm_pair(enc, qb.texts, None, qb.beta, qb.dynamic), enc.text_to_image
    if qb.bank is None or len(qb.bank) == 0:
        raise ValueError("QB-Norm needs a non-empty bank split")
    # the bank's images are queries (of the image->text direction), not gallery items: test-time
    # views are a gallery-side average, so the bank is encoded in one view (and costs 1/tta)
    bank_kwargs = {**{k: v for k, v in kwargs.items() if k != "trunk_cache"}, "tta": 1}
    enc = encode_dataset(backbone, dataset, **kwargs)
    bank = encode_dataset(backbone, qb.bank, **bank_kwargs)
    return qbnorm_scores(enc, bank, qb.beta, qb.dynamic), enc.text_to_image


def qbnorm_scores(enc: Encoded, bank: Encoded, beta: float, dynamic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """QB-Norm's ``(t2i, i2t)`` pair of an encoded split's cosine matrix over an encoded bank."""
    return qbnorm_pair(enc, bank.texts, bank.images, beta, dynamic)


def qbnorm_pair(enc: Encoded, bank_texts: torch.Tensor | None, bank_images: torch.Tensor | None, beta: float,
                dynamic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """QB-Norm's ``(t2i, i2t)`` pair of an encoded split's cosine matrix: its images normalised by
    the bank captions ``bank_texts`` (text->image), its captions by the bank images ``bank_images``
    (image->text); a side whose bank is None keeps the plain cosine (a caption-only bank)."""
    from rsitr.retrieval.qbnorm import qb_norm

    with torch.no_grad():
        (image_norm, image_active) = qbnorm_side(enc.images, bank_texts, beta, dynamic)
        (text_norm, text_active) = qbnorm_side(enc.texts, bank_images, beta, dynamic)
        return qb_norm(enc.images @ enc.texts.t(), image_norm, text_norm, image_active, text_active)


def qbnorm_side(gallery: torch.Tensor, bank: torch.Tensor | None, beta: float,
                dynamic: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One side of a QB-Norm pair: the normalisers of ``gallery``'s items by the bank queries
    ``bank`` (and, with ``dynamic``, which items the bank activates); with no bank, zeros (the plain
    cosine) and no activation set."""
    from rsitr.retrieval.qbnorm import activation_set, bank_normalizers

    if bank is None:
        return torch.zeros(gallery.shape[0]), None
    return bank_normalizers(gallery, bank, beta), activation_set(gallery, bank) if dynamic else None


def evaluate(backbone: Backbone, dataset: CaptionDataset, method=None, ties: str = "expected",
             rerank: str | None = None, rerank_options: dict | None = None, **kwargs) -> dict[str, float]:
    """Standard protocol metrics (percent) of ``backbone`` on ``dataset`` (one split).

    ``method``: the method that scores the split (e.g. FTF's re-ranking, iEBAKER's SAR; a loaded
    checkpoint's is :attr:`rsitr.methods.factory.LoadedModel.method`); None: pooled cosine. ``rerank``: a named
    re-ranker of :mod:`rsitr.retrieval.rerank` applied to that matrix afterwards (``"sar"``,
    with ``rerank_options`` such as ``k``), usable on any model; ``"qbnorm"`` with
    ``rerank_options={"qbnorm": QBNormBank(...)}`` ranks the pooled cosine normalised by a query
    bank (:func:`qbnorm_similarity`; the method's own scoring is not applied)."""
    return evaluate_ties(backbone, dataset, method=method, ties=(ties,), rerank=rerank, rerank_options=rerank_options, **kwargs)[ties]


def evaluate_ties(backbone: Backbone, dataset: CaptionDataset, method=None, ties=("expected", "optimistic", "pessimistic"),
                  rerank: str | None = None, rerank_options: dict | None = None, **kwargs) -> dict[str, dict[str, float]]:
    """:func:`evaluate` under several tie conventions at once (``{ties: metrics}``), scoring the
    split once. See :mod:`rsitr.retrieval.metrics` for what each convention counts."""
    from rsitr.retrieval.metrics import TIES
    from rsitr.retrieval.rerank import NO_RERANK, rerank as apply_rerank

    for t in ties:
        if t not in TIES:
            raise ValueError(f"ties must be among {TIES}, got {t!r}")
    if len(dataset) == 0:
        raise ValueError("cannot evaluate an empty split")
    parts = [(name, a, b) for name, a, b in dataset.parts() if b > a]
    if parts:
        return _evaluate_parts(backbone, dataset, parts, method, ties, rerank, rerank_options, **kwargs)
    t0 = time.perf_counter()
    if rerank == "qbnorm":
        qb = (rerank_options or {}).get("qbnorm")
        if not isinstance(qb, QBNormBank):
            raise ValueError("rerank='qbnorm' needs rerank_options={'qbnorm': QBNormBank(bank split, beta)}")
        sim, text_to_image = qbnorm_similarity(backbone, dataset, qb, **kwargs)
    else:
        # no named re-ranker (None or "none"): each direction by the method's own matrix (a two-stage
        # method's candidates depend on the query direction); a re-ranker needs the one matrix
        sim, text_to_image = similarity(backbone, dataset, method=method, per_direction=rerank in NO_RERANK, **kwargs)
    if not isinstance(sim, tuple):
        sim = apply_rerank(rerank, sim, **(rerank_options or {}))
    out = {t: pair_metrics(sim, text_to_image, ties=t) for t in ties}
    log.info("evaluated %d images / %d captions in %.1fs: mR %s", len(dataset), len(text_to_image), time.perf_counter() - t0,
             ", ".join(f"{out[t]['mR']:.2f} ({t} ties)" for t in ties) if len(ties) > 1 else f"{out[ties[0]]['mR']:.2f}")
    return out


def pair_metrics(sim, text_to_image, ties: str = "expected") -> dict[str, float]:
    """The protocol's metrics of one ``[images, texts]`` matrix, or of a ``(t2i, i2t)`` pair of
    them (each direction ranked by its own matrix: two-stage scoring, QB-Norm)."""
    from rsitr.retrieval.metrics import METRIC_KEYS, retrieval_metrics

    if isinstance(sim, tuple):
        m_t2i, m_i2t = (retrieval_metrics(s, text_to_image, ties=ties) for s in sim)
        metrics = {k: (m_i2t if k.startswith("i2t") else m_t2i)[k] for k in METRIC_KEYS[:6]}
        metrics["mR"] = sum(metrics.values()) / 6.0
    else:
        metrics = retrieval_metrics(sim, text_to_image, ties=ties)
    return {k: float(v) for k, v in metrics.items()}


def _evaluate_parts(backbone, dataset, parts, method, ties, rerank, rerank_options, **kwargs) -> dict[str, dict[str, float]]:
    """A mix of datasets (:mod:`rsitr.data.mixed`): every part's split is scored on its own (the
    protocol ranks within one dataset); the metrics are the mean over the parts, and each part's
    own under ``"<part>:<metric>"`` (e.g. ``"rsicd:mR"``)."""
    cache = kwargs.pop("trunk_cache", None)
    if rerank == "qbnorm":
        raise ValueError("QB-Norm evaluation of a mix of datasets is not supported: evaluate each dataset with its own bank")
    per = {}
    for name, a, b in parts:
        sub_cache = cache.subset(dataset, a, b) if cache is not None else None
        per[name] = evaluate_ties(backbone, dataset.subset(a, b), method=method, ties=ties, rerank=rerank, rerank_options=rerank_options,
                                  trunk_cache=sub_cache, **kwargs)
    out = {}
    for t in ties:
        keys = list(next(iter(per.values()))[t])
        metrics = {k: float(sum(per[n][t][k] for n in per) / len(per)) for k in keys}
        for n in per:
            metrics.update({f"{n}:{k}": v for k, v in per[n][t].items()})
        out[t] = metrics
    return out
