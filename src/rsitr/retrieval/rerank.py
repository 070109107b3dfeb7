"""Re-ranking of a test similarity matrix. SAR: Sort After Reversed retrieval (iEBAKER).

``sim`` is the ``(n_images, n_texts)`` score matrix of :mod:`rsitr.retrieval.metrics` (column
``j`` ranks the images for text query ``j``; row ``i`` ranks the texts for image query ``i``).

SAR
---
A retrieval result is re-sorted after asking the *reverse* question: for a text query ``t`` and
a candidate image ``v`` among its top ``k_t2i`` images, where does ``t`` land when ``v`` is the
query (``v``'s ranking of all texts)? A right image usually ranks its own captions near its top;
an image that scores ``t`` highly only because it scores every text highly (a "hub") does not.

For one query ``q`` (text or image), its candidates are its top ``k`` items by score (``k_t2i``
images for a text, ``k_i2t`` texts for an image). Let ``f`` be a candidate's forward rank
(0-based position in ``q``'s list) and ``r`` its *reverse* rank: the position of ``q`` in the
candidate's own top list (``k_i2t`` texts for an image candidate, ``k_t2i`` images for a text
candidate), or "absent" when ``q`` is not in it. The new order of ``q``'s candidates is

1. the *mutual* candidates (``r`` present), by ``f / k_fwd + w * r / k_rev`` (rank sum, each rank
   divided by its list length; ``w = reverse_weight``, 1 for ``direction="both"``), ties by the
   original score;
2. then the other candidates, in their original order.

Everything below the top ``k`` is left as it was. So SAR never changes *which* items are a
query's top ``k``, only their order; R@K for ``K >= k`` is unchanged by construction.

Because the key of a mutual pair ``(v, t)`` is a function of the pair only, one matrix holds the
re-ranking of *both* directions (``direction="both"``, the default): it scores cell ``(i, j)`` in
three bands - mutual pairs on top (by their key), then pairs in exactly one of the two top lists,
then the rest, the last two bands by the original score. In column ``j`` the text's top ``k_t2i``
images are exactly the cells of the two upper bands that lie in that list (a cell in the image's
top list only has a lower original score than every image of the text's list, so it sorts below
them), and likewise in rows: the matrix gives the SAR order in both directions at once. The
returned scores are float64 ``band * 4 + value`` with ``value`` in ``[0, 1]``; only their order
means anything. ``direction="t2i"`` (or ``"i2t"``) instead permutes the original scores inside
each column's (row's) top ``k`` to the SAR order and leaves everything else untouched (same
dtype as ``sim``; the other direction is then not meaningful).

Where the paper is silent (its code release has no SAR), our choices: candidates are the top
``k`` (default 10 both ways: SAR re-sorts the list a user sees; R@10 cannot change); "reverse
rank" is the position in the candidate's own top list, absent beyond it (a reverse rank is only
trusted as far as the forward one is); mutual candidates go first, ranked by the normalised rank
sum with ``reverse_weight`` 1.

Cost: two top-k passes (over column blocks and row blocks) and one pass writing the output in
row blocks. Working memory is ``O(chunk * max(n_images, n_texts) + k * (n_images + n_texts))``
beyond the output matrix, never ``n_images x n_texts`` temporaries of its own; ``chunk``
defaults to about 2**19 scores per block (measured: ~60-75 MB of temporaries beyond the float64
output for RSICD- and NWPU-size test splits, 1093 x 5465 and 3150 x 15750).
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_BLOCK = 1 << 19  # scores per block: the temporaries of a block stay around 40 MB


def _as_tensor(sim) -> torch.Tensor:
    t = sim.detach().cpu() if isinstance(sim, torch.Tensor) else torch.as_tensor(np.asarray(sim))
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty 2-D (n_images, n_texts) matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    return t


def _check_block(blk: torch.Tensor) -> torch.Tensor:
    if torch.isnan(blk).any():
        raise ValueError("sim contains NaN")
    return blk.float() if blk.dtype in (torch.float16, torch.bfloat16) else blk


def _chunk(chunk: int | None, width: int) -> int:
    if chunk is not None:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        return int(chunk)
    return max(1, DEFAULT_BLOCK // max(1, width))


def _stable_topk(block: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Indices of the k largest along ``dim``; ties keep the lower index first (deterministic)."""
    return torch.sort(block, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)


def top_lists(sim, k_t2i: int, k_i2t: int, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(col_top [k_t2i, n_texts], row_top [n_images, k_i2t])``: each text's best images and each
    image's best texts, best first (ties by index), computed in blocks."""
    s = _as_tensor(sim)
    n, m = s.shape
    kc, kr = min(k_t2i, n), min(k_i2t, m)
    cc = _chunk(chunk, n)
    col_top = torch.empty(kc, m, dtype=torch.long)
    for j in range(0, m, cc):
        col_top[:, j : j + cc] = _stable_topk(_check_block(s[:, j : j + cc]), kc, 0)
    rc = _chunk(chunk, m)
    row_top = torch.empty(n, kr, dtype=torch.long)
    for i in range(0, n, rc):
        row_top[i : i + rc] = _stable_topk(_check_block(s[i : i + rc]), kr, 1)
    return col_top, row_top


def _rank_blocks(col_top: torch.Tensor, row_top: torch.Tensor, i0: int, i1: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ranks of rows ``i0:i1`` in the text lists (``rc``: position of image i in column
    j's top list, -1 if absent) and in the image lists (``rr``: position of text j in row i's top
    list, -1 if absent)."""
    h = i1 - i0
    rc = torch.full((h, m), -1, dtype=torch.int32)
    sel = (col_top >= i0) & (col_top < i1)
    p, j = sel.nonzero(as_tuple=True)
    rc[col_top[p, j] - i0, j] = p.to(torch.int32)
    rr = torch.full((h, m), -1, dtype=torch.int32)
    kr = row_top.shape[1]
    rows = torch.arange(h).unsqueeze(1).expand(h, kr)
    rr[rows, row_top[i0:i1]] = torch.arange(kr, dtype=torch.int32).unsqueeze(0).expand(h, kr)
    return rc, rr


def sar(
    sim,
    k: int = 10,
    *,
    k_t2i: int | None = None,
    k_i2t: int | None = None,
    reverse_weight: float = 1.0,
    direction: str = "both",
    chunk: int | None = None,
) -> torch.Tensor:
    """Sort After Reversed retrieval: a re-scored ``(n_images, n_texts)`` matrix whose row and
    column orders are the SAR orders (see the module doc). ``k`` is the candidate depth of both
    directions unless ``k_t2i`` (images per text query) / ``k_i2t`` (texts per image query) are
    given; ``chunk`` is the rows/columns per block (default: about 2**19 scores per block)."""
    if direction not in ("both", "t2i", "i2t"):
        raise ValueError(f"direction must be 'both', 't2i' or 'i2t', got {direction!r}")
    if reverse_weight < 0:
        raise ValueError(f"reverse_weight must be >= 0, got {reverse_weight}")
    if direction == "both" and reverse_weight != 1.0:
        raise ValueError("direction='both' ranks both directions with one key per (image, text) pair, which weighs the "
                         "forward and the reverse rank alike: reverse_weight must be 1 (use direction 't2i' or 'i2t')")
    s = _as_tensor(sim)
    kc = int(k_t2i if k_t2i is not None else k)
    kr = int(k_i2t if k_i2t is not None else k)
    if kc < 1 or kr < 1:
        raise ValueError(f"candidate depths must be >= 1, got k_t2i={kc}, k_i2t={kr}")
    n, m = s.shape
    kc, kr = min(kc, n), min(kr, m)
    col_top, row_top = top_lists(s, kc, kr, chunk)
    if direction == "both":
        return _sar_both(s, col_top, row_top, kc, kr, reverse_weight, chunk)
    if direction == "t2i":
        return _sar_one(s, col_top, row_top, kc, kr, reverse_weight, chunk)
    return _sar_one(s.t(), row_top.t(), col_top.t(), kr, kc, reverse_weight, chunk).t()  # a transposed view, no copy


def _sar_both(s: torch.Tensor, col_top, row_top, kc: int, kr: int, w: float, chunk: int | None) -> torch.Tensor:
    # w is 1 here (checked by sar): the key must weigh both ranks alike to serve both directions
    n, m = s.shape
    lo, hi = float(s.min()), float(s.max())
    span = hi - lo if hi > lo else 1.0
    # key of a mutual cell, g = f_c / kc + w * r / kr seen from the text side, in [0, 1 + w];
    # distinct keys differ by at least 1 / (kc * kr) when w = 1; the score tie-break stays below
    # a quarter of that
    gmax = 1.0 + w
    tie = 0.25 / (kc * kr)
    out = torch.empty(n, m, dtype=torch.float64)
    rcs = _chunk(chunk, m)
    for i0 in range(0, n, rcs):
        i1 = min(n, i0 + rcs)
        val = (s[i0:i1].double() - lo) / span  # [0, 1]
        rc, rr = _rank_blocks(col_top, row_top, i0, i1, m)
        in_c, in_r = rc >= 0, rr >= 0
        band = in_c.to(torch.float64) + in_r.to(torch.float64)
        mutual = in_c & in_r
        g = (rc.double() * kr + w * rr.double() * kc) / (kc * kr)  # exact for integer w: equal keys stay equal
        key = 1.0 - (g + tie * (1.0 - val)) / (gmax + tie)
        out[i0:i1] = band * 4.0 + torch.where(mutual, key, val)
    return out


def _sar_one(s: torch.Tensor, col_top, row_top, kc: int, kr: int, w: float, chunk: int | None) -> torch.Tensor:
    """Re-sort each column's top ``kc`` (text queries over images) by permuting its scores.
    ``row_top`` gives each image's top ``kr`` texts (the reverse lists)."""
    n, m = s.shape
    out = s.clone()
    cc = _chunk(chunk, kc * kr)
    ar_r = torch.arange(kr)
    for j0 in range(0, m, cc):
        j1 = min(m, j0 + cc)
        cand = col_top[:, j0:j1]  # [kc, b] image indices, best first
        b = j1 - j0
        cols = torch.arange(j0, j1).unsqueeze(0).expand(kc, b)
        scores = s[cand, cols]  # [kc, b], descending
        # reverse rank: position of text j in row_top[cand]
        hit = row_top[cand] == cols.unsqueeze(-1)  # [kc, b, kr]
        present = hit.any(-1)
        rev = torch.where(present, (hit.to(torch.int64) * ar_r).sum(-1), torch.zeros_like(cols))
        fwd = torch.arange(kc).unsqueeze(1).expand(kc, b).double()
        g = fwd * kr + w * rev.double() * kc  # (f / kc + w * r / kr) * kc * kr, exact for integer w
        # mutual first by (g, score), then the others by forward rank; sort by a lexicographic key
        big = 2.0 * (1.0 + w) * kc * kr + 1.0
        key = torch.where(present, g, big + fwd)
        order = torch.from_numpy(np.lexsort((-scores.double().numpy(), key.numpy()), axis=0))  # [kc, b]
        new_pos = torch.empty_like(order)
        new_pos.scatter_(0, order, torch.arange(kc).unsqueeze(1).expand(kc, b).contiguous())
        # the candidate now at position p gets the p-th best original score
        out[cand, cols] = torch.gather(scores, 0, new_pos)
    return out


def sar_order(sim, query: int, direction: str = "t2i", **kwargs) -> list[int]:
    """Candidates of one query in SAR order (the full ranking of that query after re-scoring);
    a convenience for tests and inspection."""
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    r = sar(sim, direction=direction, **kwargs)
    vec = r[:, query] if direction == "t2i" else r[query]
    return torch.sort(vec, descending=True, stable=True).indices.tolist()


RERANKERS = {"sar": sar}
# the names that ask for no re-ranker (the score matrix as the method gives it)
NO_RERANK = (None, "", "none")


def rerank(name: str | None, sim, **kwargs) -> torch.Tensor:
    """Apply a named re-ranker (``"sar"``; ``None``/``"none"`` returns ``sim``)."""
    if name in NO_RERANK:
        return sim
    if name not in RERANKERS:
        raise ValueError(f"unknown re-ranker {name!r}; available: none, {', '.join(sorted(RERANKERS))}")
    return RERANKERS[name](sim, **kwargs)
