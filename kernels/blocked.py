"""Blocked CPU path: dequantize a tile of output rows into a small buffer, then the dense GEMM on it.

No dense copy of the weight is kept: per call, tiles of `tile_rows` output rows (N) by all of
K are dequantized one at a time into buffers of a few MiB that are reused for every tile,
and the dense matmul of the compute dtype (oneDNN / MKL) runs on each tile, writing its
slice of the output. Dequantizing costs a fixed time per call while the GEMM grows with M,
so this wins where compute dominates (large M); dispatch.py picks it by measurement.

Layout trick: the tile is dequantized with K in "nibble-major" order (per group of the
layer, the codes at even k, then the codes at odd k), so each nibble lands in a contiguous
run of group_size / 2 values; the activations get the same permutation of K once per call
(M x K values, cheap next to the GEMM), and x @ W.T is unchanged by permuting K on both
sides. Each weight is (code - zero) * scale computed in float32 exactly as the reference
does, then rounded once to the compute dtype: the tiles are bit-identical to
reference.dequantize_int4 (permuted); only the GEMM's summation order differs.

Example:
    >>> y = linear_blocked(x, weight)                                  # GEMM in x's dtype (fp16: fp32)
    >>> y = linear_blocked(x, weight, compute_dtype=torch.bfloat16)    # fp32 x through a bf16 GEMM
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import SYMMETRIC_ZERO
from .weights import PackedInt4Weight

TILE_ROWS = 256  # output rows dequantized at a time: 256 x 4096 is 4 MiB of fp32 work buffer


def gemm_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype `linear_blocked` multiplies in by default: x's, except fp16 (slow GEMM on most CPUs) in fp32."""
    return torch.float32 if x_dtype == torch.float16 else x_dtype


def permute_k(x: Tensor, group_size: int) -> Tensor:
    """x (M, K) with K reordered per group as [even k of the group, odd k of the group] (a copy)."""
    rows, k = x.shape
    grouped = x.reshape(rows, k // group_size, group_size // 2, 2)  # (M, G, g/2, parity)
    return grouped.transpose(-1, -2).reshape(rows, k)


class TileBuffers:
    """The reused buffers for one call: nibble codes (uint8), float32 work, the tile in compute dtype."""

    def __init__(self, tile_rows: int, in_features: int, dtype: torch.dtype) -> None:
        self.codes = torch.empty(tile_rows, in_features, dtype=torch.uint8)
        self.work = torch.empty(tile_rows, in_features, dtype=torch.float32)
        self.tile = self.work if dtype == torch.float32 else torch.empty(tile_rows, in_features, dtype=dtype)


def dequantize_tile(weight: PackedInt4Weight, start: int, stop: int, buffers: TileBuffers) -> Tensor:
    """Rows start:stop of the weight, K in nibble-major order, in the buffers' compute dtype: (rows, K)."""
    rows, groups, half = stop - start, weight.in_features // weight.group_size, weight.group_size // 2
    packed = weight.packed[start:stop].view(rows, groups, half)
    codes = buffers.codes[:rows].view(rows, groups, 2, half)  # (rows, G, nibble, g/2)
    torch.bitwise_and(packed, 0x0F, out=codes[:, :, 0])  # even k
    torch.bitwise_right_shift(packed, 4, out=codes[:, :, 1])  # odd k
    zero = SYMMETRIC_ZERO if weight.zeros is None else weight.zeros[start:stop].view(rows, groups, 1, 1)
    codes.sub_(zero)  # code - zero in [-15, 15]: exact modulo 256, read back as int8
    work = buffers.work[:rows].view(rows, groups, 2, half)
    work.copy_(codes.view(torch.int8))
    work.mul_(weight.scales[start:stop].float().view(rows, groups, 1, 1))  # (code - zero) * scale, as the reference
    if buffers.tile is buffers.work:
        return buffers.work[:rows]
    tile = buffers.tile[:rows]
    tile.copy_(buffers.work[:rows])  # one rounding to the compute dtype, as the reference's .to(x.dtype)
    return tile


def linear_blocked(
    x: Tensor,
    weight: PackedInt4Weight,
    bias: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    tile_rows: int = TILE_ROWS,
) -> Tensor:
    """y = x @ W.T + bias with W dequantized tile by tile (never whole); returns x's dtype.

    compute_dtype: the GEMM's dtype (default `gemm_dtype(x.dtype)`); x is cast to it once and
    the result cast back. Memory beyond the int4 weight: about tile_rows x K x 7 bytes of
    buffers plus the permuted x and the output.
    """
    if weight.group_size % 2:
        raise ValueError(f"the blocked path needs an even group size, got {weight.group_size}")
    dtype = compute_dtype or gemm_dtype(x.dtype)
    rows = x.reshape(-1, weight.in_features)
    permuted = permute_k(rows.to(dtype), weight.group_size)  # (M, K)
    out_t = torch.empty(weight.out_features, rows.shape[0], dtype=dtype)  # (N, M): each tile writes whole rows
    buffers = TileBuffers(min(tile_rows, weight.out_features), weight.in_features, dtype)
    for start in range(0, weight.out_features, tile_rows):
        stop = min(start + tile_rows, weight.out_features)
        torch.mm(dequantize_tile(weight, start, stop, buffers), permuted.t(), out=out_t[start:stop])
    out = out_t.t().to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.contiguous().reshape(*x.shape[:-1], weight.out_features)
