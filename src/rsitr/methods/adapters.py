"""RDB's Cross-Modal Asymmetric Adapter (CMAA): the Visual Enhancement Adapter (VEA) and the
Text Semantic Adapter (TSA), generic over the hidden width of the block they sit in.

Both follow the ``adapter`` slot protocol of the backbones: ``adapter(x, valid) -> x`` with
``x`` ``[B, N, W]`` (a block's output) and ``valid`` ``[B, N]`` bool (True on real tokens) or
None; the returned tensor already contains the residual path. The up-projection is
zero-initialised, so a freshly built adapter is the identity and the frozen backbone's
zero-shot behaviour is the starting point of training. Padding positions (``valid`` False)
are returned unchanged.

VEA -- :class:`DiffAttnAdapter` (Differential Attention, Ye et al. 2024, "Differential
Transformer", Sec. 2.1)::

    z      = Down(LN(x))                                   # [B, N, r]   bottleneck r
    [Q1;Q2] = z Wq,  [K1;K2] = z Wk,  V = z Wv              # per head: Q/K halves of d, V of 2d
    A_j    = softmax(Q_j K_j^T / sqrt(d))                   # keys masked by ``valid``
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init  # learnable, re-parameterised
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))               # l = 1-based depth of the host block
    head   = (1 - lambda_init) * RMSNorm((A_1 - lambda A_2) V)
    out    = x + Up(GELU(z + concat_h(head)))               # Up zero-initialised

  ``r = 2 * heads * d``. When the two maps coincide (``Q1 = Q2``, ``K1 = K2``) and
  ``lambda = 1`` the attention term vanishes and the VEA is exactly the classic bottleneck
  adapter ``x + Up(GELU(Down(LN(x))))`` (Houlsby et al. 2019) -- the hand-checkable property
  the tests use.

TSA -- :class:`HierAttnAdapter` (Hierarchical Attention, Yang et al. 2016, HAN)::

    z   = Down(LN(x))                                       # [B, N, r]
    tokens are grouped into fixed windows of ``window`` consecutive positions ("phrases")
    a_i = softmax_{i in phrase}(tanh(Ww z_i + bw) . uw)     # token level, padding masked
    p_j = sum_{i in j} a_i z_i                              # phrase vectors
    b_j = softmax_j(tanh(Ws p_j + bs) . us)                 # phrase level (empty phrases masked)
    w_i = b_{j(i)} a_i                                      # token weights: sum to 1, 0 on padding
    s   = sum_j b_j p_j = sum_i w_i z_i                     # sentence vector
    out = x + Up(GELU(n_valid * w_i * z_i + s))             # key words emphasised, sentence
                                                            # context broadcast to every token

  ``n_valid * w_i`` is 1 for every token when the attention is uniform, so the adapter starts
  as a plain bottleneck on ``z`` plus the mean-pooled sentence context.

Where the RDB paper (arXiv 2505.16756) is silent -- as far as its public text could be read
here -- the choices are ours and documented in :mod:`rsitr.methods.rdb`: the LayerNorm before
the down-projection, the inner residual ``z + attention`` of the VEA, GELU, RMSNorm as the
per-head normalisation, fixed-size phrase windows for the TSA, and how the TSA's weights are
fed back to the token stream.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rsitr.utils.errors import RsitrError


def lambda_init_for_depth(depth: int) -> float:
    """Differential Transformer's depth-dependent initial lambda, ``depth`` 1-based."""
    if depth < 1:
        raise RsitrError(f"layer depth must be >= 1, got {depth}")
    return 0.8 - 0.6 * math.exp(-0.3 * (depth - 1))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False (broadcast to ``scores``).
    Rows with no valid position give all zeros (not NaN)."""
    if mask is None:
        return torch.softmax(scores, dim=dim)
    mask = mask.expand_as(scores)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)


def differential_attention(
    q1: torch.Tensor, k1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
    lam: torch.Tensor | float, key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(softmax(Q1 K1^T / sqrt(d)) - lam * softmax(Q2 K2^T / sqrt(d))) V``.

    q*, k*: ``[B, H, N, d]``; v: ``[B, H, N, dv]``; key_mask: ``[B, N]`` bool (True = real key).
    """
    scale = q1.shape[-1] ** -0.5
    m = key_mask[:, None, None, :] if key_mask is not None else None
    a1 = masked_softmax(q1 @ k1.transpose(-1, -2) * scale, m)
    a2 = masked_softmax(q2 @ k2.transpose(-1, -2) * scale, m)
    return (a1 - lam * a2) @ v


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last axis with a learnable gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _zero_linear(inp: int, out: int) -> nn.Linear:
    lin = nn.Linear(inp, out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class DiffAttnAdapter(nn.Module):
    """VEA: bottleneck adapter with multi-head differential attention (see the module doc).

    width: hidden width of the host block; bottleneck: ``r`` (a multiple of ``2 * heads``);
    depth: 1-based depth of the host block (sets ``lambda_init``); lambda_std: std of the
    normal init of the four lambda vectors (the DIFF Transformer reference uses 0.1).
    """

    def __init__(self, width: int, bottleneck: int = 64, heads: int = 4, depth: int = 1, lambda_std: float = 0.1):
        super().__init__()
        if heads < 1 or bottleneck % (2 * heads):
            raise RsitrError(f"VEA bottleneck {bottleneck} must be a positive multiple of 2 * heads ({2 * heads})")
        self.width, self.bottleneck, self.heads, self.depth = width, bottleneck, heads, depth
        self.head_dim = bottleneck // (2 * heads)  # d: size of each Q/K half; V has 2d per head
        self.lambda_init = lambda_init_for_depth(depth)
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.q_proj = nn.Linear(bottleneck, bottleneck, bias=False)
        self.k_proj = nn.Linear(bottleneck, bottleneck, bias=False)
        self.v_proj = nn.Linear(bottleneck, bottleneck, bias=False)
        d = self.head_dim
        self.lambda_q1 = nn.Parameter(torch.randn(d) * lambda_std)
        self.lambda_k1 = nn.Parameter(torch.randn(d) * lambda_std)
        self.lambda_q2 = nn.Parameter(torch.randn(d) * lambda_std)
        self.lambda_k2 = nn.Parameter(torch.randn(d) * lambda_std)
        self.head_norm = RMSNorm(2 * d)
        self.act = nn.GELU()
        self.up = _zero_linear(bottleneck, width)

    def lam(self) -> torch.Tensor:
        """The re-parameterised lambda (a scalar shared by the heads of this adapter)."""
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def attention(self, z: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The normalised, scaled multi-head differential attention of bottleneck features
        ``z`` ``[B, N, r]`` -> ``[B, N, r]``."""
        b, n, r = z.shape
        h, d = self.heads, self.head_dim
        q = self.q_proj(z).view(b, n, h, 2, d).permute(3, 0, 2, 1, 4)  # [2, B, H, N, d]
        k = self.k_proj(z).view(b, n, h, 2, d).permute(3, 0, 2, 1, 4)
        v = self.v_proj(z).view(b, n, h, 2 * d).transpose(1, 2)  # [B, H, N, 2d]
        o = differential_attention(q[0], k[0], q[1], k[1], v, self.lam().to(z.dtype), valid)
        o = self.head_norm(o) * (1.0 - self.lambda_init)
        return o.transpose(1, 2).reshape(b, n, r)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        z = self.down(self.norm(x))
        out = x + self.up(self.act(z + self.attention(z, valid)))
        if valid is not None:
            out = torch.where(valid[..., None], out, x)
        return out


class HierAttnAdapter(nn.Module):
    """TSA: bottleneck adapter with two-level (token -> phrase -> sentence) attention pooling.

    width: hidden width of the host block; bottleneck: ``r``; window: tokens per phrase
    (fixed windows of consecutive positions; ``window <= 0`` makes the whole sequence one
    group, i.e. sentence-level attention only); ctx_std: std of the normal init of the two
    context vectors (0 gives exactly uniform attention at the start).
    """

    def __init__(self, width: int, bottleneck: int = 32, window: int = 4, ctx_std: float = 0.02):
        super().__init__()
        if bottleneck < 1:
            raise RsitrError(f"TSA bottleneck must be >= 1, got {bottleneck}")
        self.width, self.bottleneck, self.window = width, bottleneck, int(window)
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.word_proj = nn.Linear(bottleneck, bottleneck)
        self.word_ctx = nn.Parameter(torch.randn(bottleneck) * ctx_std)
        self.phrase_proj = nn.Linear(bottleneck, bottleneck)
        self.phrase_ctx = nn.Parameter(torch.randn(bottleneck) * ctx_std)
        self.act = nn.GELU()
        self.up = _zero_linear(bottleneck, width)

    def hierarchy(self, z: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token weights ``w`` ``[B, N]`` (sum to 1 over valid tokens, 0 on padding), the
        sentence vector ``[B, r]`` and the phrase weights ``[B, N]`` of features ``z`` ``[B, N, r]``.

        Phrase ``j`` holds positions ``j*window .. (j+1)*window - 1`` (``window <= 0``, or one
        at least as long as the text: one phrase). Phrases are indexed ``0 .. N-1``; those past
        the last real one are empty and weigh 0. Written with no Python number taken from the
        text length (no padding to a multiple of the window): a traced ONNX graph of a model
        with this adapter takes texts of every length, as torch does."""
        n = z.shape[1]
        pos = torch.arange(n, device=z.device)
        group = torch.div(pos, self.window, rounding_mode="floor") if self.window > 0 else torch.zeros_like(pos)
        member = valid[:, None, :] & (group[None, None, :] == pos[None, :, None])  # [B, G=N, N]: token i in phrase j
        scores = torch.tanh(self.word_proj(z)) @ self.word_ctx.to(z.dtype)  # [B, N]
        a_tok = masked_softmax(scores[:, None, :].expand_as(member), member)  # [B, G, N] token level, per phrase
        phrases = a_tok @ z  # [B, G, r]
        a_phr = masked_softmax(torch.tanh(self.phrase_proj(phrases)) @ self.phrase_ctx.to(z.dtype), member.any(-1))  # [B, G]
        w = (a_phr[..., None] * a_tok).sum(1)
        sentence = (a_phr[..., None] * phrases).sum(1)
        return w, sentence, a_phr

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        z = self.down(self.norm(x))
        w, sentence, _ = self.hierarchy(z, valid)
        n_valid = valid.sum(-1, keepdim=True).clamp(min=1).to(z.dtype)
        h = self.act(z * (w * n_valid)[..., None] + sentence[:, None, :])
        return torch.where(valid[..., None], x + self.up(h), x)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are turned into (persistent) buffers of the
    same names: it computes the same function, is saved in state dicts, but has no parameters
    (so optimizers and trainable-parameter counts never see it). Used for EMA teachers."""
    import copy

    twin = copy.deepcopy(module)
    for m in twin.modules():
        for name, p in list(m._parameters.items()):
            del m._parameters[name]
            m.register_buffer(name, None if p is None else p.detach().clone())
    twin.requires_grad_(False)
    return twin
