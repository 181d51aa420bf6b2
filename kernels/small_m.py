"""CPU path for a few rows of activations: int4 weights dequantized in registers, AVX512-BF16 dot products.

For M <= 16 (decode steps, small batches) a dense layer is memory-bound: it streams 2-4 bytes
per weight for few multiply-adds. This path streams the int4 codes (0.5 byte per weight),
turns 32 of them at a time into bf16 pairs in registers and runs vdpbf16ps against every row
of x, so the weights are read once per call whatever M is (torch's int4pack kernel re-reads
and re-dequantizes them for every few rows, which is why it falls below dense bf16 at M = 16).
The kernel is kernels/csrc/small_m_bf16.cpp (compiled by native.py); it needs a CPU with
AVX-512 BF16, otherwise `small_m_unsupported` says why and dispatch does not offer it.

Numbers: the weights are exactly `cpu_bf16_cached`'s ((code - zero) * scale in float32,
rounded once to bf16), x is rounded to bf16 (fp32 / fp16 x), sums are fp32; the output is cast
to x's dtype. Tolerance: tests/kernels/helpers.py (same bound as cpu_bf16_cached).

The weight form ("tiles16", built once per layer and cached with it; int4-sized: the codes
regrouped plus scales and zeros as float32) puts 16 output rows side by side:
codes (N/16, K/2, 16), scales and zeros (N/16, G, 16); N is padded to a multiple of 16 with
rows of zero scale whose outputs are dropped.

Example:
    >>> y = linear_small_m(x, weight)   # x (M <= 16, K), any float dtype
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .native import native_module
from .reference import SYMMETRIC_ZERO
from .weights import PackedInt4Weight

MAX_ROWS = 16  # rows of x per kernel call; more rows are split into calls of 16 (each reads the weights again)
LANES = 16
FORM = "cpu_small_m:tiles16"


def small_m_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    """Why this path cannot run (x, weight), or None when it can."""
    if x.device.type != "cpu" or weight.packed.device.type != "cpu":
        return "it runs on the CPU only"
    if weight.group_size % 2:
        return f"it needs an even group size, got {weight.group_size}"
    module = native_module()
    if module is None or not module.small_m_available():
        return "its compiled kernel is not available (needs a C++ compiler and a CPU with AVX-512 BF16)"
    return None


def tiles16(weight: PackedInt4Weight) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scales, zeros) in the kernel's layout (module notes), N padded to a multiple of 16."""
    n, half = weight.packed.shape
    blocks = -(-n // LANES)
    pad = blocks * LANES - n
    packed = weight.packed
    scales = weight.scales.float()
    zeros = torch.full_like(scales, SYMMETRIC_ZERO) if weight.zeros is None else weight.zeros.float()
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad, half)])
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])  # zero scale: the rows give 0
        zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])

    def lanes_last(t: Tensor) -> Tensor:
        return t.reshape(blocks, LANES, t.shape[1]).transpose(1, 2).contiguous()

    return lanes_last(packed), lanes_last(scales), lanes_last(zeros)


def linear_small_m(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias for any number of rows (16 per kernel call); returns x's dtype."""
    codes, scales, zeros = weight.form(FORM, tiles16)
    rows = x.reshape(-1, weight.in_features).to(torch.bfloat16).contiguous()
    if rows.shape[0] == 0:
        out = torch.empty(0, weight.out_features)
    else:
        kernel = native_module().small_m_bf16
        parts = [kernel(rows[start:start + MAX_ROWS], codes, scales, zeros, weight.group_size)
                 for start in range(0, rows.shape[0], MAX_ROWS)]
        out = (parts[0] if len(parts) == 1 else torch.cat(parts))[:, : weight.out_features]
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.out_features)
