"""CPU path with int8 activations: int4 codes times int8 x in integer dot products (AVX512-VNNI or AVX2).

Where compute dominates (M from a few dozen rows up), every float path does the multiply-adds of a
dense bf16 GEMM plus dequantization, so it cannot beat oneDNN's bf16 GEMM. Integer dot products
run twice as many multiply-adds per instruction (vpdpbusd: 64 u8 x s8, against 32 for vdpbf16ps;
benchmarks/kernels/int8_activations.md), so this path rounds x to int8 per row and per block of BLOCK = 32
k (symmetric, scale max |x| / 127, nearest even) and multiplies the stored 4-bit codes with it
exactly in int32; each block's sum is scaled once in fp32 (kernels/csrc/int8_act_gemm.cpp gives
the formula). This is the scheme llama.cpp runs for every Q4 x Q8_0 product and ONNX Runtime's
MatMulNBits at accuracy level 4. CPUs with AVX2 but no AVX-512 VNNI run the same numbers through
vpmaddubsw / vpmaddwd (kernels/csrc/int8_act_avx2.cpp): the only fast path such CPUs have for M = 1,
where it streams the 4-bit codes at several times the speed of any float path
(benchmarks/kernels/int4-cpu-avx2.md).

Numbers: the only new error is x's rounding to int8, at most half a step (sx / 2) per element,
so |y - y_ref| <= sum over blocks of sx / 2 * sum |w| over the block, plus fp32 rounding
(tests/kernels/helpers.py: `int8_activation_bound`). That is more than bf16 rounding of x, so
automatic dispatch offers this path only where the policy allows it (environment
QAT_INT8_ACTIVATIONS): `bf16` (default: bf16 activations, where no float path reaches dense speed
from M ~ 32), `all` (fp16 / fp32 x too), `off`. On SmolLM2's held-out text, bf16 activations
through it: perplexity +0.09 % over the float kernels (benchmarks/kernels/int8_activations.md).

Weight form (built once per layer, `vnni_form`): the codes regrouped so one 64-byte load is 16
output rows x 8 k (N x K / 2 bytes, as stored: a second int4 copy, not a dense one), and scales
/ zero points as (ceil(N / 16), G, 16) in their stored dtypes (zeros uint8): as many bytes as
stored, so a decode step, bound by memory, streams no more than the stored layer.

Example:
    >>> y = linear_int8_act(x, weight)       # x (..., K) bf16 / fp16 / fp32; y in x's dtype
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import native_module
from .reference import SYMMETRIC_ZERO, unpack_int4
from .weights import PackedInt4Weight

# k per activation scale. 32 (llama.cpp's Q8_0): SmolLM2 with every layer forced through this path, perplexity
# +0.4 % over exact fp32 x with 32, +0.7 % with 64 (benchmarks/kernels/int8_activations.md); 64 / 128 ran 5-15 % faster.
BLOCK = 32
ENV_VAR = "QAT_INT8_ACTIVATIONS"
POLICIES = ("bf16", "all", "off")
FORM = "int8_act"
PANEL = 16  # output rows per 64-byte vector of codes


def policy() -> str:
    """Where automatic dispatch may use int8 activations: `bf16` (default), `all` or `off`."""
    value = os.environ.get(ENV_VAR, "bf16").strip().lower()
    if value not in POLICIES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def allowed_for(dtype: torch.dtype) -> bool:
    """Whether the policy lets automatic dispatch run activations of this dtype through int8."""
    chosen = policy()
    return chosen == "all" or (chosen == "bf16" and dtype == torch.bfloat16)


def int8_act_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    """Why this path cannot run (x, weight), or None when it can."""
    if x.device.type != "cpu" or weight.packed.device.type != "cpu":
        return "it runs on the CPU only"
    if weight.group_size % BLOCK:
        return f"it needs a group size that is a multiple of {BLOCK}, got {weight.group_size}"
    module = native_module()
    if module is None or not module.int8_act_available():
        return "its compiled kernel is not available (needs a C++ compiler and a CPU with AVX2 + FMA + F16C)"
    return None


@dataclass(frozen=True)
class VnniForm:
    codes: Tensor  # uint8 (P, K / 8, 64), P = ceil(N / 16)
    scales: Tensor  # (P, G, 16), the stored scales' dtype
    zeros: Tensor  # uint8 (P, G, 16)


def _panels(values: Tensor, fill: float) -> Tensor:
    """(N, G) -> (ceil(N / 16), G, 16), rows past N filled with `fill`."""
    rows = values.shape[0]
    padded = F.pad(values, (0, 0, 0, -rows % PANEL), value=fill)
    return padded.reshape(-1, PANEL, values.shape[1]).transpose(1, 2).contiguous()


def vnni_codes(packed: Tensor) -> Tensor:
    """Stored codes (N, K / 2) -> (P, K / 8, 64): byte 4 j + i of chunk c holds row j's codes of k = 8 c + i (low
    nibble) and k = 8 c + 4 + i (high)."""
    rows, k = packed.shape[0], packed.shape[1] * 2
    codes = F.pad(unpack_int4(packed), (0, 0, 0, -rows % PANEL))  # (P * 16, K), padded rows: code 0
    chunks = codes.reshape(-1, PANEL, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (P, C, row j, i, half)
    return (chunks[..., 0] | (chunks[..., 1] << 4)).reshape(-1, k // 8, 64).contiguous()


def vnni_form(weight: PackedInt4Weight) -> VnniForm:
    """The kernel's form of a layer (built once; see the module docstring)."""
    zeros = weight.zeros if weight.zeros is not None else torch.full(
        weight.scales.shape, SYMMETRIC_ZERO, dtype=torch.uint8)
    return VnniForm(vnni_codes(weight.packed), _panels(weight.scales, 0.0), _panels(zeros, 0))


def quantize_activations_reference(x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """The specification of the kernel's activation quantizer, x (M, K) float -> (q int8, sx fp32, qsum int32).

    Per row and block of k: sx = max |x| / 127 in fp32 (1 where that is 0: an all-zero block, or one whose
    largest value is so small that the division underflows), q = round(x / sx) to
    nearest even, qsum = the block's sum of q; a block with an infinity or NaN: sx = NaN, q = 0 (its row's
    outputs become NaN). kernels/csrc/int8_act_gemm.cpp computes the same bits.
    """
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // block, block)
    finite = torch.isfinite(blocks).all(-1)
    blocks = torch.where(finite.unsqueeze(-1), blocks, torch.zeros_like(blocks))
    sx = blocks.abs().amax(-1) / 127
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    q = torch.round(blocks / sx.unsqueeze(-1))
    sx = torch.where(finite, sx, torch.full_like(sx, float("nan")))
    return q.to(torch.int8).reshape(rows, k), sx, q.sum(-1).to(torch.int32)


def linear_int8_act(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias with x rounded to int8 per row and block (see the module docstring); x's dtype out."""
    return _apply(x, weight.form(FORM, vnni_form), weight.in_features, weight.out_features, bias)


def int8_act_bound(weight: PackedInt4Weight, bias: Optional[Tensor] = None,
                   plain_rows: bool = False) -> Callable[[Tensor], Tensor]:
    """`linear_int8_act(·, weight, bias)` with the form fetched once, for one layer called per token.

    Skips the cached-form lookup (and its stale-weight check) of each call: the weights must not be
    written while the returned function is in use. `plain_rows`: every x will be a contiguous float32
    (M, K) tensor, so the call goes straight to the kernel (a decode step's projection: 3 us instead of 12).
    """
    form: VnniForm = weight.form(FORM, vnni_form)
    bias32 = None if bias is None else bias.float()
    if plain_rows:
        kernel, n = native_module().int8_act_linear, weight.out_features
        if bias32 is None:
            return lambda x: kernel(x, form.codes, form.scales, form.zeros, n, BLOCK)
        return lambda x: kernel(x, form.codes, form.scales, form.zeros, n, BLOCK).add_(bias32)
    return lambda x: _apply(x, form, weight.in_features, weight.out_features, bias32)


def _apply(x: Tensor, form: VnniForm, in_features: int, out_features: int, bias: Optional[Tensor]) -> Tensor:
    rows = x.reshape(-1, in_features)
    if rows.dtype not in (torch.bfloat16, torch.float32):
        rows = rows.float()
    out = native_module().int8_act_linear(rows.contiguous(), form.codes, form.scales, form.zeros, out_features, BLOCK)
    if bias is not None:
        out += bias.float()  # in fp32, then one rounding to x's dtype
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
