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

Dequantizing: one compiled pass per tile (kernels/csrc/dequant_tile.cpp, AVX-512, all of
torch's threads) where `native.native_module()` could build it; otherwise torch element-wise
ops (five passes over a DEQUANT_ROWS step, one thread). Both give the same bits.

Example:
    >>> y = linear_blocked(x, weight)                                  # GEMM in x's dtype (fp16: fp32)
    >>> y = linear_blocked(x, weight, compute_dtype=torch.bfloat16)    # fp32 x through a bf16 GEMM
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import native_module
from .reference import SYMMETRIC_ZERO
from .weights import FLOAT_QPARAMS, PackedInt4Weight, float_qparams

TILE_ROWS = 1024  # output rows per GEMM: 1024 x 4096 is 8 MiB in bf16
DEQUANT_ROWS = 256  # rows dequantized per step through the float32 work buffer (4 MiB at K = 4096)
# Threads for the dequantizing element-wise ops (the GEMM uses all of torch's). One: each op on a 2-thread
# pool is a parallel region whose barrier stalls whenever the OS preempts one thread, which on a shared
# machine cost more than the second thread gains (measured in benchmarks/kernels/int4-cpu-all-m.md). None: torch's.
DEQUANT_THREADS: Optional[int] = 1


def gemm_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype `linear_blocked` multiplies in by default: x's, except fp16 (slow GEMM on most CPUs) in fp32."""
    return torch.float32 if x_dtype == torch.float16 else x_dtype


def permute_k(x: Tensor, group_size: int) -> Tensor:
    """x (M, K) with K reordered per group as [even k of the group, odd k of the group] (a copy)."""
    rows, k = x.shape
    grouped = x.reshape(rows, k // group_size, group_size // 2, 2)  # (M, G, g/2, parity)
    return grouped.transpose(-1, -2).reshape(rows, k)


class TileBuffers:
    """The reused buffers for one call: the tile, and (torch-op path only) nibble codes (uint8) and float32 work
    for DEQUANT_ROWS rows."""

    def __init__(self, tile_rows: int, in_features: int, dtype: torch.dtype, native: bool = False) -> None:
        self.native = native  # the compiled dequantizer writes the tile directly
        if native:
            self.codes = self.work = None
            self.tile = torch.empty(tile_rows, in_features, dtype=dtype)
            return
        step = min(tile_rows, DEQUANT_ROWS)
        self.codes = torch.empty(step, in_features, dtype=torch.uint8)
        self.work = torch.empty(step if dtype != torch.float32 else tile_rows, in_features, dtype=torch.float32)
        self.tile = self.work if dtype == torch.float32 else torch.empty(tile_rows, in_features, dtype=dtype)


def _dequantize_rows(weight: PackedInt4Weight, start: int, stop: int, codes: Tensor, work: Tensor) -> None:
    """work[:stop - start] = rows start:stop of W in float32, K nibble-major (bit-identical to the reference)."""
    rows, groups, half = stop - start, weight.in_features // weight.group_size, weight.group_size // 2
    packed = weight.packed[start:stop].view(rows, groups, half)
    nibbles = codes[:rows].view(rows, groups, 2, half)  # (rows, G, nibble, g/2)
    torch.bitwise_and(packed, 0x0F, out=nibbles[:, :, 0])  # even k
    torch.bitwise_right_shift(packed, 4, out=nibbles[:, :, 1])  # odd k
    zero = SYMMETRIC_ZERO if weight.zeros is None else weight.zeros[start:stop].view(rows, groups, 1, 1)
    nibbles.sub_(zero)  # code - zero in [-15, 15]: exact modulo 256, read back as int8
    values = work[:rows].view(rows, groups, 2, half)
    values.copy_(nibbles.view(torch.int8))
    values.mul_(weight.scales[start:stop].float().view(rows, groups, 1, 1))  # (code - zero) * scale, as the reference


@contextmanager
def _dequant_threads() -> Iterator[None]:
    """torch's intra-op threads set to DEQUANT_THREADS for the block, restored after (process-wide setting)."""
    previous = torch.get_num_threads()
    if DEQUANT_THREADS is None or previous == DEQUANT_THREADS:
        yield
        return
    torch.set_num_threads(DEQUANT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def dequantize_tile(weight: PackedInt4Weight, start: int, stop: int, buffers: TileBuffers) -> Tensor:
    """Rows start:stop of the weight, K in nibble-major order, in the buffers' compute dtype: (rows, K)."""
    if buffers.native:
        scales, zeros = weight.form(FLOAT_QPARAMS, float_qparams)
        native_module().dequantize_tile(weight.packed, scales, zeros, weight.group_size, start, stop, buffers.tile)
        return buffers.tile[: stop - start]
    step = buffers.codes.shape[0]
    with _dequant_threads():
        if buffers.tile is buffers.work:
            for first in range(start, stop, step):
                last = min(first + step, stop)
                _dequantize_rows(weight, first, last, buffers.codes, buffers.work[first - start:])
            return buffers.work[: stop - start]
        for first in range(start, stop, step):
            last = min(first + step, stop)
            _dequantize_rows(weight, first, last, buffers.codes, buffers.work)
            buffers.tile[first - start:last - start].copy_(buffers.work[: last - first])  # one rounding, as .to()
    return buffers.tile[: stop - start]


def linear_blocked(
    x: Tensor,
    weight: PackedInt4Weight,
    bias: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    tile_rows: int = TILE_ROWS,
) -> Tensor:
    """y = x @ W.T + bias with W dequantized tile by tile (never whole); returns x's dtype.

    compute_dtype: the GEMM's dtype (default `gemm_dtype(x.dtype)`); x is cast to it once and
    the result cast back. Memory beyond the int4 weight: tile_rows x K in the compute dtype plus
    DEQUANT_ROWS x K x 5 bytes of work buffers on the torch-op path (13 MiB at K = 4096, bf16), the permuted x and
    the output.
    """
    if weight.group_size % 2:
        raise ValueError(f"the blocked path needs an even group size, got {weight.group_size}")
    dtype = compute_dtype or gemm_dtype(x.dtype)
    rows = x.reshape(-1, weight.in_features)
    permuted = permute_k(rows.to(dtype), weight.group_size)  # (M, K)
    out = torch.empty(rows.shape[0], weight.out_features, dtype=dtype)  # (M, N)
    native = dtype in (torch.float32, torch.bfloat16) and weight.packed.is_contiguous() and native_module() is not None
    buffers = TileBuffers(min(tile_rows, weight.out_features), weight.in_features, dtype, native)
    for start in range(0, weight.out_features, tile_rows):
        stop = min(start + tile_rows, weight.out_features)
        # x @ tile.T, as F.linear lays out the dense layer: oneDNN runs this form 1.2-1.4x faster than tile @ x.T
        # at M = 16-256 (bf16, 1024-row tiles; the slice copy is M x 1024 values)
        out[:, start:stop] = F.linear(permuted, dequantize_tile(weight, start, stop, buffers))
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.contiguous().reshape(*x.shape[:-1], weight.out_features)
