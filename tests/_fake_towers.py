"""A small two-tower-like backbone: the slot protocol and the backbone interface without the
towers' weights (for adapter tests and the method contract tests).

The text tower is 3 BERT layers of width 10 (``adapter_slots("text")``, kind ``"blocks"``: LoRA
and RDB's TSA find their BERT attention and adapter slots there), the image tower a strided
convolution whose 4x4 spatial tokens of width 12 pass one token-adapter slot
(``adapter_slots("image")``, kind ``"token"``) before pooling, as the real two-tower's CNN does.
Both project to an 8-dimensional space."""
from __future__ import annotations

import torch
from torch import nn

from rsitr.data.transforms import PreprocessConfig
from rsitr.models.base import AdapterSlots, Backbone, BackboneCapabilities, BackboneInfo, Features
from rsitr.models.towers.minilm import BertConfig, BertLayer, bert_attention_projections

CONTEXT = 12
VOCAB = 97


class FakeSlot(nn.Module):
    def __init__(self):
        super().__init__()
        self.adapter = None

    def forward(self, x, valid=None):
        return x if self.adapter is None else self.adapter(x, valid)


class FakeTowers(Backbone):
    capabilities = BackboneCapabilities(adapter_slots={"image": "token", "text": "blocks"})

    def __init__(self):
        super().__init__()
        self.embed_dim = 8
        self.context_length = CONTEXT
        self.info = BackboneInfo(kind="towers", name="fake", config={"image_width": 12})
        self.preprocess = PreprocessConfig(image_size=16)
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=10, num_attention_heads=2, intermediate_size=20, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        self.embed = nn.Embedding(VOCAB, 10)
        self.text_blocks = nn.ModuleList(BertLayer(cfg) for _ in range(3))
        self.text_proj = nn.Linear(10, 8)
        self.stem = nn.Conv2d(3, 12, kernel_size=4, stride=4)
        self.slot = FakeSlot()
        self.image_proj = nn.Linear(12, 8)

    def adapter_slots(self, modality):
        if modality == "text":
            return AdapterSlots("blocks", tuple(self.text_blocks), (10,) * len(self.text_blocks))
        return AdapterSlots("token", (self.slot,), (12,))

    def attention_projections(self, block):
        return bert_attention_projections(block)

    def tokenize(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [1] + [2 + sum(map(ord, w)) % (VOCAB - 2) for w in t.lower().split()][: CONTEXT - 1]
            ids[i, : len(words)] = torch.tensor(words)
        return ids

    def text_features(self, ids):
        valid = ids != self.pad_id
        x = self.embed(ids)
        key_bias = torch.zeros(ids.shape[0], 1, 1, ids.shape[1]).masked_fill(~valid[:, None, None, :], -1e4)
        for blk in self.text_blocks:
            x = blk(x, key_bias)
        tokens = self.text_proj(x)
        m = valid[..., None].float()
        return Features((tokens * m).sum(1) / m.sum(1).clamp_min(1.0), tokens, valid)

    def image_features(self, pixels):
        x = self.stem(pixels).flatten(2).transpose(1, 2)  # [B, 16, 12]
        tokens = self.image_proj(self.slot(x))
        return Features(tokens.mean(1), tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
