"""The compiled decode-step operations (kernels/csrc/decode_ops.cpp) against the tensor ops they replace.

Tolerance: float32 with sums in other orders (the norm's mean of squares, dot products over 8 partial
sums, softmax's total): a few units of fp32 roundoff relative to the values' scale; 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from qat.kernels.native import native_module

OPS = native_module()
if OPS is None:
    pytest.skip("the compiled kernels could not be built here (no C++ compiler)", allow_module_level=True)

RELATIVE = 1e-6


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return float((actual - expected).abs().max()) <= RELATIVE * float(expected.abs().max())


def test_residual_rms_norm_adds_in_place_and_normalizes_like_rms_norm():
    generator = torch.Generator().manual_seed(0)
    x, delta, weight = (torch.randn(1, 576, generator=generator) for _ in range(3))
    weight = weight.flatten()
    start = x.clone()
    normed = OPS.residual_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, start + delta)  # one float32 addition per element: exact
    assert close(normed, F.rms_norm(start + delta, (576,), weight, 1e-5))
    again = OPS.residual_rms_norm(x, None, weight, 1e-5)  # no delta: x unchanged
    assert torch.equal(x, start + delta) and torch.equal(again, normed)


def test_silu_mul_of_the_fused_gate_up_output():
    gate_up = torch.randn(1, 2 * 1536, generator=torch.Generator().manual_seed(1)) * 4
    gate, up = gate_up.split(1536, dim=-1)
    assert close(OPS.silu_mul(gate_up), F.silu(gate) * up)


def _rotary(dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (rotate_half's sign folded into sin) per position, as LlamaDecoder keeps them: (L, 1, D)."""
    angles = torch.arange(length).float()[:, None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.cat([angles, angles], dim=-1)
    sign = torch.ones(dim)
    sign[: dim // 2] = -1
    return angles.cos().unsqueeze(1), (angles.sin() * sign).unsqueeze(1)


@pytest.mark.parametrize("heads,kv_heads,dim,position", [(9, 3, 64, 0), (9, 3, 64, 40), (4, 4, 16, 5),
                                                         (8, 2, 32, 700)], ids=["first", "gqa", "mha", "threaded"])
def test_decode_attention_rotates_writes_the_cache_and_attends_like_sdpa(heads, kv_heads, dim, position):
    generator = torch.Generator().manual_seed(position)
    length = position + 3
    cos, sin = _rotary(dim, length)
    cache = torch.randn(2 * kv_heads, length, dim, generator=generator)
    cache[:, position:] = 0  # nothing written past this token yet
    qkv = torch.randn(1, (heads + 2 * kv_heads) * dim, generator=generator)
    heads_of = qkv.view(heads + 2 * kv_heads, dim).clone()
    rotating = heads_of[: heads + kv_heads]
    rotated = rotating * cos[position] + rotating.roll(dim // 2, -1) * sin[position]
    expected_cache = cache.clone()
    expected_cache[:kv_heads, position] = rotated[heads:]
    expected_cache[kv_heads:, position] = heads_of[heads + kv_heads:]
    query = rotated[:heads].view(kv_heads, heads // kv_heads, dim)
    keys, values = expected_cache[:kv_heads, : position + 1], expected_cache[kv_heads:, : position + 1]
    expected = F.scaled_dot_product_attention(query, keys, values, scale=dim ** -0.5).reshape(1, heads * dim)

    out = OPS.decode_attention(qkv, cache, cos[position], sin[position], position, heads, kv_heads, dim ** -0.5)
    assert torch.equal(qkv.view(-1, dim)[: heads + kv_heads], rotated)  # same two products and one sum per value
    assert torch.equal(cache, expected_cache)
    assert out.shape == (1, heads * dim) and close(out, expected)


def test_bad_input_is_refused_with_what_is_wrong():
    cache, cos = torch.zeros(6, 8, 64), torch.zeros(1, 64)
    with pytest.raises(RuntimeError, match="position 8 is outside the cache's 8"):
        OPS.decode_attention(torch.zeros(1, 15 * 64), cache, cos, cos, 8, 9, 3, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        OPS.decode_attention(torch.zeros(1, 14 * 64), cache, cos, cos, 0, 8, 3, 0.125)
    with pytest.raises(RuntimeError, match="qkv must hold 15 heads of 64"):
        OPS.decode_attention(torch.zeros(1, 14 * 64), cache, cos, cos, 0, 9, 3, 0.125)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        OPS.residual_rms_norm(torch.zeros(1, 64, dtype=torch.bfloat16), None, torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match="delta must be shaped like x"):
        OPS.residual_rms_norm(torch.zeros(1, 64), torch.zeros(1, 32), torch.ones(64), 1e-5)
