"""Many sequences of one length decoded together through a Llama-architecture model: the sampler of
self-generated distillation text (`qat.data.sampling`).

Hugging Face's decode step at batch 64 spends most of its time outside the matmuls on a CPU: its
dynamic KV cache concatenates every layer's keys and values anew at every token (quadratic in the
length: 2 ms a call at 100 tokens, 60 calls a step) and its CPU attention kernel is slow for one query
(3 ms a layer). This decoder keeps each layer's values in one preallocated (B, kv heads, L, D) tensor
and its keys in one (B, kv heads, D, L) (a step's scores read them as they lie), written in place, and
attends one query with two batched matmuls (scores, softmax in float32, values), the projections fused
as `LlamaDecoder` fuses them (q|k|v, gate|up; `fused_linear.py`).

Every sequence of a batch has the same length (the sampler's case: first tokens drawn, then one token
each per step), so no attention mask or padding is needed. The model is the one it is given, in its
own dtype (the sampler passes a bfloat16 copy); `unsupported_reason` says which models it runs.

Example:
    >>> decoder = BatchedLlamaDecoder(model, batch_size=64, max_length=256)
    >>> logits = decoder.forward(first_tokens)            # (64, V): after each row's prompt
    >>> logits = decoder.forward(next_tokens)             # next_tokens (64, 1): one step of each row
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.hf.fused_linear import fuse_linears
from qat.hf.llama_decoder import _Layer, _layer, _norm, _rms_norm, head_dim, unsupported_reason

__all__ = ["BatchedLlamaDecoder", "unsupported_reason"]


class BatchedLlamaDecoder:
    """Prefill and steps of `batch_size` equal-length sequences (at most `max_length` tokens each).

    Building it fuses the model's projections (the model keeps working, on the same storage); the
    weights must not change while it is in use. Logits come back as float32 tensors (B, V).
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"BatchedLlamaDecoder cannot run this model: {reason}")
        config, body = model.config, model.model
        if max_length > int(getattr(config, "max_position_embeddings", 1 << 30)):
            raise ValueError(f"{max_length} tokens exceed the model's {config.max_position_embeddings} positions")
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        if window is not None and max_length > window:
            raise ValueError(f"{max_length} tokens exceed the model's sliding window of {window}")
        self.dtype, self.device = body.norm.weight.dtype, body.norm.weight.device
        self.embed, self.final_norm = body.embed_tokens, _norm(body.norm, self.dtype)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.scale = self.head_dim ** -0.5
        self.layers = [_layer(layer, self.dtype) for layer in body.layers]
        self.head = fuse_linears([model.lm_head])
        self.batch_size, self.capacity, self.length = batch_size, max_length, 0
        shape = (len(self.layers), batch_size, self.kv_heads, max_length, self.head_dim)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # keys stored transposed, (..., D, L): a step's scores read them as they lie (no transposed copy)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device).transpose(-1, -2)
        positions = torch.arange(max_length, device=self.device).unsqueeze(0)
        cos, sin = body.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        sign = torch.ones(self.head_dim, dtype=self.dtype, device=self.device)
        sign[: self.head_dim // 2] = -1  # rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * sign
        self.cos, self.sin = cos[0].unsqueeze(1), (sin[0] * sign).unsqueeze(1)  # (L, 1, D)

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        """Append `ids` (B, P) to every row (P > 1 only from an empty cache): logits (B, V) after each row."""
        if ids.dim() != 2 or ids.shape[0] != self.batch_size or ids.shape[1] == 0:
            raise ValueError(f"ids must be ({self.batch_size}, P) token ids, got shape {tuple(ids.shape)}")
        start, count = self.length, ids.shape[1]
        if count > 1 and start > 0:
            raise ValueError("a prompt of several tokens is run from an empty cache only (prefill, then steps)")
        if start + count > self.capacity:
            raise ValueError(f"{start + count} tokens exceed the reserved {self.capacity}")
        x = self.embed(ids.to(self.device)).to(self.dtype)  # (B, P, H)
        for index, layer in enumerate(self.layers):
            x = x + self._attention(index, layer, _rms_norm(x, layer.input_norm), start)
            gate, up = layer.gate_up(_rms_norm(x, layer.post_norm)).split(layer.gate_up.sizes[0], dim=-1)
            x = x + layer.down_proj(F.silu(gate) * up)
        self.length = start + count
        return self.head(_rms_norm(x[:, -1], self.final_norm)).to(torch.float32)

    def _attention(self, index: int, layer: _Layer, x: Tensor, start: int) -> Tensor:
        """Self-attention of P new positions of every row (B, P, H); writes their keys and values."""
        batch, count = x.shape[:2]
        heads, kv_heads, dim, end = self.heads, self.kv_heads, self.head_dim, start + x.shape[1]
        qkv = layer.qkv(x).view(batch, count, heads + 2 * kv_heads, dim)  # q | k | v heads
        rotated = qkv[:, :, : heads + kv_heads]
        rotated = torch.addcmul(rotated * self.cos[start:end], rotated.roll(dim // 2, -1), self.sin[start:end])
        keys, values = self.keys[index, :, :, :, :end], self.values[index, :, :, :end]  # (B, kv, D | end, end | D)
        keys[..., start:].copy_(rotated[:, :, heads:].permute(0, 2, 3, 1))
        values[:, :, start:].copy_(qkv[:, :, heads + kv_heads:].transpose(1, 2))
        if count == 1:  # each kv head's query heads together: two batched matmuls
            query = rotated[:, 0, :heads].reshape(batch, kv_heads, heads // kv_heads, dim)
            scores = torch.matmul(query, keys).float().mul_(self.scale).softmax(dim=-1)
            out = torch.matmul(scores.to(self.dtype), values).reshape(batch, 1, heads * dim)
        else:
            out = F.scaled_dot_product_attention(rotated[:, :, :heads].transpose(1, 2), keys.transpose(-1, -2), values,
                                                 is_causal=True, scale=self.scale, enable_gqa=kv_heads != heads)
            out = out.transpose(1, 2).reshape(batch, count, heads * dim)
        return layer.o_proj(out)
