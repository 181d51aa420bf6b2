"""A one-block causal transformer language model for the synthetic-token recipe and tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyLM(nn.Module):
    """A one-block causal transformer language model (embedding, attention, MLP, head).

    `tie_embeddings=True` makes the output head use the embedding table (one weight, as in most LLMs).
    """

    def __init__(self, vocab_size: int = 64, dim: int = 64, heads: int = 4, seq_len: int = 32,
                 tie_embeddings: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.lm_head = nn.Linear(dim, vocab_size)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.heads = heads

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, vocab)
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]  # (B, T, C)
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.norm2(x))
        return self.lm_head(x)
