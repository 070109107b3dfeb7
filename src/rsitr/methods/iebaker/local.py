"""iEBAKER's local (token-level) similarity, used by EBA's schemes, as an extra alignment loss and
in the evaluation score (``local: true``).

``local(v, t)`` = mean over the caption's valid word tokens of the best cosine with any image
token (patch / spatial position) - a token-level alignment. *Our choice*: the code uses the
Frobenius norm of the token-token cosine matrix, which grows with caption length and counts
padding; the max-mean form is length-normalised. Loss: symmetric in-batch cross-entropy over
``local_scale * local`` (``local_scale`` 20 ~ the code's fixed ``exp(2.996)``), weight
``local_weight``. At evaluation the score is ``(1 - w) global + w local`` with
``w = local_eval_weight`` (0.4, the code's 0.6/0.4 mix); set it to 0 to rank by global only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rsitr.models.base import Features


def local_similarity(txt_tokens: torch.Tensor, txt_mask: torch.Tensor, img_tokens: torch.Tensor, img_mask: torch.Tensor, *, pairwise: bool = True) -> torch.Tensor:
    """Max-mean token alignment: for each valid word token its best cosine with a valid image
    token, averaged over the word tokens. ``pairwise``: ``[n_texts, n_images]`` for every pair;
    else ``[n]`` for the matched rows."""
    t = F.normalize(txt_tokens.float(), dim=-1)
    v = F.normalize(img_tokens.float(), dim=-1)
    tm = txt_mask.to(t.dtype)
    neg = torch.finfo(t.dtype).min
    if pairwise:
        s = torch.einsum("atd,bvd->abtv", t, v)
        s = s.masked_fill(~img_mask.bool()[None, :, None, :], neg).amax(-1)  # [a, b, t]
        return (s * tm[:, None, :]).sum(-1) / tm.sum(-1).clamp(min=1.0)[:, None]
    s = torch.einsum("ntd,nvd->ntv", t, v)
    s = s.masked_fill(~img_mask.bool()[:, None, :], neg).amax(-1)  # [n, t]
    return (s * tm).sum(-1) / tm.sum(-1).clamp(min=1.0)


def local_similarity_matrix(img: Features, txt: Features, budget: int = 1 << 24) -> torch.Tensor:
    """``[n_images, n_texts]`` local similarity of two encoded sets, in text blocks of bounded size."""
    n_img, n_i_tok = img.tokens.shape[:2]
    n_txt, n_t_tok = txt.tokens.shape[:2]
    step = max(1, budget // max(1, n_img * n_i_tok * max(1, n_t_tok)))
    out = torch.empty(n_img, n_txt)
    for j in range(0, n_txt, step):
        out[:, j : j + step] = local_similarity(txt.tokens[j : j + step], txt.mask[j : j + step], img.tokens, img.mask).t()
    return out
