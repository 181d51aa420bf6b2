"""The int4 linear layer in slow, readable PyTorch: the specification every fast path matches.

Layout (see docs/FORMAT.md):
    packed  uint8 (N, K // 2)    byte j of row n holds codes k = 2j (low nibble) and 2j + 1 (high)
    scales  (N, K // group_size) float16 / bfloat16 / float32
    zeros   (N, K // group_size) uint8 stored codes of the real value 0, or None meaning 8
    w[n, k] = (code[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]   (in float32)
    y = x @ w.T (+ bias), with w cast to x's dtype

Example:
    >>> packed = pack_int4(codes)                     # codes: uint8 (N, K) in [0, 15]
    >>> y = int4_linear_reference(x, packed, scales, None, group_size=128)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SYMMETRIC_ZERO = 8  # the stored code of 0 when a layer stores no zero points


def pack_int4(codes: Tensor) -> Tensor:
    """Pack uint8 codes (N, K) in [0, 15], K even, into bytes (N, K // 2), low nibble first."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"the packed dimension must be even, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("int4 codes must lie in [0, 15]")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: bytes (N, K // 2) -> uint8 codes (N, K)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> Tensor:
    """Float32 weights (N, K) from the packed layout."""
    codes = unpack_int4(packed).float()  # (N, K)
    n, k = codes.shape
    if k % group_size or scales.shape != (n, k // group_size):
        raise ValueError(f"scales {tuple(scales.shape)} do not match weights ({n}, {k}) with group size {group_size}")
    zero = torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.float32) if zeros is None else zeros.float()
    grouped = codes.view(n, k // group_size, group_size)  # (N, G, g)
    weights = (grouped - zero.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return weights.view(n, k)


def int4_linear_reference(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    group_size: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """y = x @ dequantize(w).T + bias, for x of shape (..., K); returns (..., N) in x's dtype."""
    weights = dequantize_int4(packed, scales, zeros, group_size).to(x.dtype)
    return F.linear(x, weights, None if bias is None else bias.to(x.dtype))
