"""CPU path for a few rows of float activations on AVX2 CPUs: codes dequantized in registers, fp32 FMAs.

A decode step (M = 1) is one pass over the weights with one multiply-add per weight. On CPUs without
AVX-512 the float paths so far were torch's int4pack kernel (bf16 compute) and dequantize + dense
GEMM; both spend several times longer per weight than streaming the 4-bit codes takes. This path
(kernels/csrc/gemv_f32_avx2.cpp) turns 8 codes into fp32 weights with a byte shuffle, a convert and
a subtraction, and multiplies them with x in fp32: no rounding of x or of the weights to bf16, so it is
also closer to the exact result than int4pack.

Numbers: per group, sum_k (code - zero) * x_k in fp32 FMAs (code - zero exact), times the group's
scale in one FMA into y; against the reference (fp32 weights (code - zero) * scale, fp32 sums) the
scale is applied after the sum instead of to each weight, and sums run in another order:
tests/kernels/helpers.py TOLERANCES. x of any float dtype is taken in fp32 (exact), y is cast to x's dtype.

Weight form: the int8-activation path's (`int8_act.vnni_form`, shared: a layer that runs both keeps one
copy): codes regrouped 16 rows x 8 k per 64 bytes, scales / zero points (ceil(N / 16), G, 16) in their
stored dtypes, as many bytes as stored. For M up to MAX_ROWS (each row re-reads the layer's codes from
cache); more rows are the GEMM paths' work.

Example:
    >>> y = linear_gemv_f32(x, weight)   # x (1, K) any float dtype; y in x's dtype
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .int8_act import FORM, VnniForm, vnni_form
from .native import native_module
from .weights import PackedInt4Weight

MAX_ROWS = 8  # rows of x automatic dispatch offers this path for


def gemv_f32_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    """Why this path cannot run (x, weight), or None when it can."""
    if x.device.type != "cpu" or weight.packed.device.type != "cpu":
        return "it runs on the CPU only"
    if weight.group_size % 8:
        return f"it needs a group size that is a multiple of 8, got {weight.group_size}"
    module = native_module()
    if module is None or not module.gemv_f32_available():
        return "its compiled kernel is not available (needs a C++ compiler and a CPU with AVX2 + FMA + F16C)"
    return None


def linear_gemv_f32(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias in fp32 (see the module docstring); x's dtype out."""
    return _apply(x, weight.form(FORM, vnni_form), weight.in_features, weight.out_features, bias)


def gemv_f32_bound(weight: PackedInt4Weight, bias: Optional[Tensor] = None,
                   plain_rows: bool = False) -> Callable[[Tensor], Tensor]:
    """`linear_gemv_f32(·, weight, bias)` with the form fetched once, for one layer called per token (the weights
    must not be written while the returned function is in use). `plain_rows`: every x will be a contiguous
    float32 (M, K) tensor, so the call goes straight to the kernel."""
    form: VnniForm = weight.form(FORM, vnni_form)
    bias32 = None if bias is None else bias.float()
    if plain_rows:
        kernel, n = native_module().int4_gemv_f32, weight.out_features
        if bias32 is None:
            return lambda x: kernel(x, form.codes, form.scales, form.zeros, n)
        return lambda x: kernel(x, form.codes, form.scales, form.zeros, n).add_(bias32)
    return lambda x: _apply(x, form, weight.in_features, weight.out_features, bias32)


def _apply(x: Tensor, form: VnniForm, in_features: int, out_features: int, bias: Optional[Tensor]) -> Tensor:
    rows = x.reshape(-1, in_features).float().contiguous()
    out = native_module().int4_gemv_f32(rows, form.codes, form.scales, form.zeros, out_features)
    if bias is not None:
        out += bias.float()  # in fp32, then one rounding to x's dtype
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
