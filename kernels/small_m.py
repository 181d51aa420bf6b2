"""CPU path for a few rows of activations: int4 weights dequantized in registers, AVX512-BF16 dot products.

For small M (decode steps, small batches) a dense layer is memory-bound: it streams 2-4 bytes
per weight for few multiply-adds. This path streams the int4 codes (0.5 byte per weight),
turns 32 of them at a time into bf16 in registers (one table lookup per vector: the 16
possible weights of a row's group) and runs vdpbf16ps against every row of x, so the
weights are read once per 64 rows (torch's int4pack kernel re-reads and re-dequantizes them
for every few rows, which is why it falls below dense bf16 at M = 16). The kernel is
kernels/csrc/small_m_bf16.cpp (compiled by native.py); it needs a CPU with AVX-512 BF16, a
group size that is a multiple of 32 and K a multiple of 64, otherwise `small_m_unsupported`
says why and dispatch does not offer it.

Numbers: the weights are exactly `cpu_bf16_cached`'s ((code - zero) * scale in float32,
rounded once to bf16), x is rounded to bf16 (fp32 / fp16 x), sums and the bias are fp32; the
output is cast to x's dtype once. Tolerance: tests/kernels/helpers.py.

The kernel reads the stored codes as they are; its only form is the scales and zero points
as float32 (`weights.float_qparams`: N x G x 8 bytes, 1 MiB for a 4096 x 4096 layer at group
128), kept per layer and shared with the blocked path's compiled dequantizer.

Example:
    >>> y = linear_small_m(x, weight)   # x (..., K) with any number of rows, any float dtype
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .native import native_module
from .weights import FLOAT_QPARAMS, PackedInt4Weight, float_qparams

MAX_ROWS = 64  # rows of x per kernel call; more rows are split into calls of 64 (each reads the weights again)


def small_m_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    """Why this path cannot run (x, weight), or None when it can."""
    if x.device.type != "cpu" or weight.packed.device.type != "cpu":
        return "it runs on the CPU only"
    if weight.group_size % 32:
        return f"it needs a group size that is a multiple of 32, got {weight.group_size}"
    if weight.in_features % 64:
        return f"it needs in_features (K) to be a multiple of 64, got {weight.in_features}"
    module = native_module()
    if module is None or not module.small_m_available():
        return "its compiled kernel is not available (needs a C++ compiler and a CPU with AVX-512 BF16)"
    return None


def permute_chunks(rows: Tensor) -> Tensor:
    """x (M, K) with each chunk of 64 k in the order the kernel dequantizes weights (a copy; K % 64 == 0).

    Pair p = 8 L + 4 h + q of a chunk (k = 2p, 2p + 1; 128-bit lane L, half h, q < 4) moves to 16 h + 4 L + q:
    the order of `lookup_chunk`'s unpacklo (h = 0) and unpackhi (h = 1) words in kernels/csrc/small_m_bf16.cpp.
    """
    m, k = rows.shape
    return rows.reshape(m, k // 64, 4, 2, 4, 2).transpose(2, 3).reshape(m, k)


def linear_small_m(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias for any number of rows (64 per kernel call); returns x's dtype."""
    scales, zeros = weight.form(FLOAT_QPARAMS, float_qparams)
    packed = weight.packed.contiguous()
    rows = permute_chunks(x.reshape(-1, weight.in_features).to(torch.bfloat16))
    if rows.shape[0] == 0:
        out = torch.empty(0, weight.out_features)
    else:
        kernel = native_module().small_m_bf16
        parts = [kernel(rows[start:start + MAX_ROWS], packed, scales, zeros, weight.group_size)
                 for start in range(0, rows.shape[0], MAX_ROWS)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if bias is not None:
        out = out + bias.float()  # in fp32, then one rounding to x's dtype (as a dense GEMM's epilogue)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)
