"""A lean forward for Llama-architecture causal LMs (Llama, Mistral, Qwen2): fused projections, one KV cache.

Hugging Face's forward spends most of an int4 decode step outside the matmuls: SmolLM2-135M
int4 on 2 CPU cores ran 211 kernel calls and some 4,000 small ops per token, the int4
kernels took under a third of the step (benchmarks/deploy/generate_speed.md). This decoder
computes the same function with fewer, larger calls:

* q|k|v and gate|up each run as one call (`fused_linear.py`: the layers' own int4 or float
  weights, concatenated once, no second copy);
* the KV cache is one preallocated tensor per layer written in place (no per-step cat);
* rotary cos / sin come from the model's own rotary module once for every position (so every
  rope scaling transformers implements is honoured), queries and keys rotate together;
* the residual stream, norms, attention and cache run in float32 (`dtype=`) whatever the weights'
  dtype, each norm as one `F.rms_norm`; projections run in the dtype of their weights or kernel;
* a float32 one-token step on the CPU runs the small operations between the projections as three
  compiled calls per layer (`kernels/csrc/decode_ops.cpp`: residual add + norm, rotary + cache
  write + attention, silu * up) instead of some twenty tensor ops, where the compiled kernels are
  available (`fused_ops=False` keeps the tensor ops).

It reads the modules of the model it is given (from `qat.load` or `from_pretrained`) and
runs one sequence at a time: the case of `qat generate`. Models it cannot run exactly are
refused with the reason (`unsupported_reason`), and generation falls back to Hugging Face's.

Example:
    >>> decoder = LlamaDecoder(qat.load("smollm2-int4.safetensors"))
    >>> logits = decoder.prefill(torch.tensor([1, 2, 3]))     # (V,): the next token after the prompt
    >>> logits = decoder.step(int(logits.argmax()))           # (V,): and after that one
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.hf.fused_linear import FusedLinear, fuse_linears
from qat.kernels.native import native_module

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # the same layer layout (qwen2: q/k/v biases)
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why LlamaDecoder cannot run `model` exactly (None if it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        kind = getattr(config, "model_type", type(model).__name__)
        return f"model type {kind!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the decoder implements silu)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp={config.pretraining_tp} (the decoder implements 1)"
    if getattr(config, "use_sliding_window", False) and "sliding_attention" in (getattr(config, "layer_types", None)
                                                                                 or ["sliding_attention"]):
        return "sliding-window attention layers (the decoder implements full attention)"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb") or not hasattr(model, "lm_head"):
        return "it does not have the LlamaForCausalLM layout (model.layers, model.rotary_emb, lm_head)"
    for index, layer in enumerate(body.layers):
        for owner, names in ((getattr(layer, "self_attn", None), _ATTENTION), (getattr(layer, "mlp", None), _MLP)):
            missing = [name for name in names if owner is None or not hasattr(owner, name)]
            if missing:
                return f"layer {index} has no {', '.join(missing)}"
    return None


def head_dim(config: Any) -> int:
    """A Llama-layout config's attention head size (`head_dim`, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class _Norm:
    """A LlamaRMSNorm's weight (in the decoder's dtype) and epsilon."""

    weight: Tensor
    eps: float


def _norm(module: nn.Module, dtype: torch.dtype) -> _Norm:
    return _Norm(module.weight.detach().to(dtype), float(module.variance_epsilon))


def _rms_norm(x: Tensor, norm: _Norm) -> Tensor:
    """LlamaRMSNorm as one call: x * rsqrt(mean(x^2) + eps) * weight."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


@dataclass
class _Layer:
    """One decoder layer's norms and projections (q|k|v and gate|up fused)."""

    input_norm: _Norm
    qkv: FusedLinear
    o_proj: FusedLinear
    post_norm: _Norm
    gate_up: FusedLinear
    down_proj: FusedLinear


def _layer(layer: nn.Module, dtype: torch.dtype) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    return _Layer(_norm(layer.input_layernorm, dtype),
                  fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj]),
                  fuse_linears([attention.o_proj]), _norm(layer.post_attention_layernorm, dtype),
                  fuse_linears([mlp.gate_proj, mlp.up_proj]), fuse_linears([mlp.down_proj]))


def _compiled_ops(dtype: torch.dtype, device: torch.device) -> Optional[Any]:
    """The compiled decode-step operations (kernels/csrc/decode_ops.cpp) where they apply: float32 on the CPU."""
    if dtype != torch.float32 or device.type != "cpu":
        return None
    return native_module()


def _float32_rows(call: Callable[[Tensor], Tensor], x: Tensor) -> bool:
    """Whether a bound projection returns contiguous float32 rows, as the compiled operations need."""
    with torch.inference_mode():
        out = call(x)
    return out.dtype == torch.float32 and out.is_contiguous() and out.dim() == 2


@dataclass
class _DecodeCalls:
    """A layer's projections bound to one-token inputs (kernel chosen and checked once)."""

    qkv: Callable[[Tensor], Tensor]
    o_proj: Callable[[Tensor], Tensor]
    gate_up: Callable[[Tensor], Tensor]
    down_proj: Callable[[Tensor], Tensor]


class LlamaDecoder:
    """Prefill and one-token steps for a Llama-architecture model (one sequence, batch 1).

    Building it fuses the model's projections (the model keeps working, on the same storage); the
    weights must not change while it is in use. Logits come back as float32 inference-mode tensors.
    """

    def __init__(self, model: nn.Module, max_length: int = 512, dtype: torch.dtype = torch.float32,
                 fused_ops: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LlamaDecoder cannot run this model: {reason}")
        config, body = model.config, model.model
        self.model, self.embed, self.final_norm = model, body.embed_tokens, _norm(body.norm, dtype)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.vocab_size = int(config.vocab_size)
        self.head_dim = head_dim(config)
        self.scale = self.head_dim ** -0.5
        self.max_position = int(getattr(config, "max_position_embeddings", 1 << 30))
        # Mistral's window: full attention is the same computation while the sequence fits in it
        self.window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.dtype, self.device = dtype, body.norm.weight.device
        self.layers = [_layer(layer, dtype) for layer in body.layers]
        self._next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]  # after each layer
        self.head = fuse_linears([model.lm_head])
        self._decode: Optional[tuple[list[_DecodeCalls], Callable[[Tensor], Tensor]]] = None
        self._ops = _compiled_ops(dtype, self.device) if fused_ops else None
        self.length = 0  # tokens in the cache
        self.capacity = 0
        self.reserve(max_length)

    def reserve(self, max_length: int) -> None:
        """Make room for `max_length` tokens (cache and rotary tables); drops the cached sequence."""
        if max_length > self.max_position:
            raise ValueError(f"{max_length} tokens exceed the model's {self.max_position} positions")
        if self.window is not None and max_length > self.window:
            raise ValueError(f"{max_length} tokens exceed the model's sliding window of {self.window} "
                             "(the decoder implements full attention within it)")
        self.length = 0
        if max_length <= self.capacity:
            return
        # per layer: keys of every kv head, then values, (2 kv_heads, L, D): one copy writes a token's k and v
        shape = (len(self.layers), 2 * self.kv_heads, max_length, self.head_dim)
        self.cache = list(torch.zeros(shape, dtype=self.dtype, device=self.device))
        positions = torch.arange(max_length, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.model.model.rotary_emb(probe, positions)  # (1, L, D) each, in the decoder's dtype
        half = self.head_dim // 2
        sign = torch.ones(self.head_dim, dtype=self.dtype, device=self.device)
        sign[:half] = -1  # rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * sign
        self.cos, self.sin = cos[0].unsqueeze(1), (sin[0] * sign).unsqueeze(1)  # (L, 1, D)
        self.capacity = max_length

    def reset(self) -> None:
        """Forget the cached sequence (the next call is a prefill from position 0)."""
        self.length = 0

    @torch.inference_mode()
    def prefill(self, ids: Tensor, all_logits: bool = False) -> Tensor:
        """Run the prompt `ids` (P,) from an empty cache: logits (V,) of the last position, or (P, V)."""
        self.reset()
        return self.forward(ids, all_logits)

    @torch.inference_mode()
    def step(self, token: int) -> Tensor:
        """Append one token to the cached sequence: logits (V,) for the position after it."""
        if self.length >= self.capacity:
            raise ValueError(f"{self.length + 1} tokens exceed the reserved {self.capacity}: call reserve() first")
        self._check_ids(token, token)
        layers, head = self._decode_calls()
        if self._ops is not None:
            return self._compiled_step(token, layers, head)
        position, heads, kv_heads, dim, end = self.length, self.heads, self.kv_heads, self.head_dim, self.length + 1
        cos, sin, group, scale = self.cos[position], self.sin[position], heads // kv_heads, self.scale
        x = self.embed(torch.tensor([token], device=self.device)).to(self.dtype)  # (1, H)
        for layer, calls, cache in zip(self.layers, layers, self.cache, strict=True):
            qkv = calls.qkv(_rms_norm(x, layer.input_norm)).view(heads + 2 * kv_heads, dim)  # q | k | v heads
            rotated = qkv[: heads + kv_heads]  # q and k rotated together, in place
            torch.addcmul(rotated * cos, rotated.roll(dim // 2, -1), sin, out=rotated)
            cache[:, position].copy_(qkv[heads:])  # this token's k and v
            query = qkv[:heads].view(kv_heads, group, dim)  # each kv head's query heads together
            scores = torch.bmm(query, cache[:kv_heads, :end].transpose(1, 2)).mul_(scale)  # (kv, group, L)
            attended = torch.bmm(scores.softmax(dim=-1), cache[kv_heads:, :end])  # (kv_heads, group, D)
            x = x + calls.o_proj(attended.view(1, heads * dim))
            gate, up = calls.gate_up(_rms_norm(x, layer.post_norm)).split(layer.gate_up.sizes[0], dim=-1)
            x = x + calls.down_proj(F.silu(gate) * up)
        self.length = position + 1
        return head(_rms_norm(x, self.final_norm))[0].to(torch.float32)

    def _compiled_step(self, token: int, layers: list[_DecodeCalls], head: Callable[[Tensor], Tensor]) -> Tensor:
        """`step` with the operations between projections as compiled calls (float32, CPU; see the module doc)."""
        ops, position = self._ops, self.length
        cos, sin = self.cos[position], self.sin[position]
        x = self.embed(torch.tensor([token], device=self.device)).to(self.dtype).clone()  # (1, H), updated in place
        normed = ops.residual_rms_norm(x, None, self.layers[0].input_norm.weight, self.layers[0].input_norm.eps)
        for layer, calls, cache, next_norm in zip(self.layers, layers, self.cache, self._next_norms, strict=True):
            attended = ops.decode_attention(calls.qkv(normed), cache, cos, sin, position, self.heads, self.kv_heads,
                                            self.scale)
            normed = ops.residual_rms_norm(x, calls.o_proj(attended), layer.post_norm.weight, layer.post_norm.eps)
            normed = ops.residual_rms_norm(x, calls.down_proj(ops.silu_mul(calls.gate_up(normed))),
                                           next_norm.weight, next_norm.eps)
        self.length = position + 1
        return head(normed)[0].to(torch.float32)

    def prepare(self) -> None:
        """Choose and build every projection's one-token kernel now (else the first step pays for it)."""
        self._decode_calls()

    def _decode_calls(self) -> tuple[list[_DecodeCalls], Callable[[Tensor], Tensor]]:
        """The projections bound to one-token inputs of this decoder's dtype (built on the first step)."""
        if self._decode is None:
            def like(features: int) -> Tensor:
                return torch.zeros(1, features, dtype=self.dtype, device=self.device)

            hidden = like(self.model.config.hidden_size)
            layers = [_DecodeCalls(layer.qkv.bind(hidden), layer.o_proj.bind(like(self.heads * self.head_dim)),
                                   layer.gate_up.bind(hidden), layer.down_proj.bind(like(layer.gate_up.sizes[0])))
                      for layer in self.layers]
            self._decode = (layers, self.head.bind(hidden))
            attended = like(self.heads * self.head_dim)
            probes = [probe for calls, layer in zip(layers, self.layers, strict=True)
                      for probe in ((calls.qkv, hidden), (calls.o_proj, attended), (calls.gate_up, hidden),
                                    (calls.down_proj, like(layer.gate_up.sizes[0])))]
            halves = all(layer.gate_up.sizes == [layer.gate_up.sizes[0]] * 2 for layer in self.layers)
            if self._ops is not None and not (halves and all(_float32_rows(call, x) for call, x in probes)):
                self._ops = None  # another dtype or layout, or gate | up of unequal widths: the tensor ops
        return self._decode

    @torch.inference_mode()
    def forward(self, ids: Tensor, all_logits: bool = False) -> Tensor:
        """Append `ids` (P,) to the cached sequence; logits of its last position (V,), or of all (P, V)."""
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"ids must be a non-empty 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        self._check_ids(int(ids.min()), int(ids.max()))
        start, count = self.length, ids.numel()
        if start + count > self.capacity:
            raise ValueError(f"{start + count} tokens exceed the reserved {self.capacity}: call reserve() first")
        x = self.embed(ids.to(self.device)).to(self.dtype)  # (P, H)
        mask = self._mask(start, count)
        for layer, cache in zip(self.layers, self.cache, strict=True):
            x = x + self._attention(layer, cache, _rms_norm(x, layer.input_norm), start, mask)
            gate, up = layer.gate_up(_rms_norm(x, layer.post_norm)).split(layer.gate_up.sizes[0], dim=-1)
            x = x + layer.down_proj(F.silu(gate) * up)
        self.length = start + count
        logits = self.head(_rms_norm(x if all_logits else x[-1:], self.final_norm)).to(torch.float32)
        return logits if all_logits else logits[0]

    def _check_ids(self, low: int, high: int) -> None:
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the model's vocabulary of {self.vocab_size}")

    def _mask(self, start: int, count: int) -> Optional[Tensor]:
        """Boolean (P, start + P) mask where a prompt continues a cached sequence; None otherwise."""
        if count == 1 or start == 0:
            return None  # one new token sees everything; a fresh prompt uses is_causal
        rows = torch.arange(count, device=self.device).unsqueeze(1) + start
        return torch.arange(start + count, device=self.device).unsqueeze(0) <= rows

    def _attention(self, layer: _Layer, cache: Tensor, x: Tensor, start: int, mask: Optional[Tensor]) -> Tensor:
        """Self-attention of P new positions (P, H) over the cache and themselves; writes their keys / values."""
        count, heads, kv_heads, dim = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = layer.qkv(x).view(count, heads + 2 * kv_heads, dim)  # q | k | v heads
        rotated = qkv[:, : heads + kv_heads]  # q and k rotated together
        cos, sin = self.cos[start:start + count], self.sin[start:start + count]  # (P, 1, D)
        rotated = torch.addcmul(rotated * cos, rotated.roll(dim // 2, -1), sin)
        end = start + count
        cache[:kv_heads, start:end].copy_(rotated[:, heads:].transpose(0, 1))
        cache[kv_heads:, start:end].copy_(qkv[:, heads + kv_heads:].transpose(0, 1))
        out = F.scaled_dot_product_attention(
            rotated[:, :heads].transpose(0, 1), cache[:kv_heads, :end], cache[kv_heads:, :end], attn_mask=mask,
            is_causal=mask is None and count > 1, scale=self.scale, enable_gqa=kv_heads != heads)  # (heads, P, D)
        return layer.o_proj(out.transpose(0, 1).reshape(count, heads * dim))
