"""Fused unpack + dequantize + matmul for int4 weights (W4A16) in Triton, and their launchers.

Both kernels read the canonical layout directly (reference.py): byte k // 2 of row n holds
code k in its low nibble when k is even, high nibble when odd, so no repack is needed; each
weight is dequantized exactly as the reference does, w = (code - zero) * scale in fp32, then
rounded to x's dtype before it meets x.

* `gemv_kernel` (small M): one program per (row of x, BLOCK_N outputs, slice of K). Slices
  ("split-K") give enough programs to fill the GPU when M * N / BLOCK_N is small; their fp32
  partial sums go to a (SPLIT_K, M, N) buffer summed on the host (deterministic, no atomics).
* `gemm_kernel` (medium M): (BLOCK_M, BLOCK_N) output tiles, weight tiles dequantized in
  registers and fed to tl.dot (tensor cores) with fp32 accumulation.
* Above `GEMM_MAX_M` the weight is dequantized once and the dense matmul runs (the fused
  kernels lose to cuBLAS when the matmul is compute-bound). The crossovers are not tuned:
  no GPU was available when this was written; see benchmarks/kernels-cpu.md.

On a GPU the kernels are autotuned per (M bucket, N, K, group size). Under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors) they run one fixed small config, and two
interpreter gaps are worked around behind the INTERPRET constexpr: its tl.dot multiplies
bf16 bit patterns as integers (so operands go to fp32 first: bf16 x bf16 products are exact
in fp32, as on tensor cores), and its fp32 -> bf16 cast truncates (so rounding to nearest
even is done with integer ops).

This module imports triton at import time: import it only through dispatch (which guards it).
"""

# Triton's convention: compile-time (tl.constexpr) parameters and shape sizes are UPPER_CASE, and
# constexpr if/else stays a statement inside kernels.
# ruff: noqa: N803, SIM108, SIM300

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import dequantize_int4
from .weights import PackedInt4Weight

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GEMV_MAX_M = 4  # GEMV for M <= 4 (re-reads the weight per row of x; L2 absorbs it)
GEMM_MAX_M = 64  # fused GEMM for 4 < M <= 64; dequantize + dense matmul above
SPLIT_K_QUANTUM = 256  # K slices are multiples of this: every GEMV BLOCK_K must divide it

_TORCH_TO_TRITON = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _round_to(values, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> DTYPE rounded to nearest even (the interpreter truncates bf16, so do it by hand)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(DTYPE)


@triton.jit
def _dequantize(packed_ptr, scales_ptr, zeros_ptr, rows, cols, k_first, row_mask, mask, packed_stride,
                groups_stride, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights w[rows, cols] = (code - zero) * scale; rows/cols broadcast to the tile shape.

    The tile's columns are k_first + [0, BLOCK_K) with k_first a multiple of BLOCK_K; when BLOCK_K
    divides the group size they share one group, so one scale (and zero) per row is loaded.
    """
    byte = tl.load(packed_ptr + rows * packed_stride + cols // 2, mask=mask, other=0).to(tl.int32)
    code = ((byte >> ((cols & 1) * 4)) & 0xF).to(tl.float32)
    if GROUP_SIZE % BLOCK_K == 0:
        group_offsets = rows * groups_stride + k_first // GROUP_SIZE
        group_mask = row_mask
    else:
        group_offsets = rows * groups_stride + cols // GROUP_SIZE
        group_mask = mask
    scale = tl.load(scales_ptr + group_offsets, mask=group_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + group_offsets, mask=group_mask, other=0).to(tl.float32)
    else:
        zero = 8.0
    return (code - zero) * scale


@triton.jit
def gemv_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, partial_ptr, M, N, K, x_stride, packed_stride,
                groups_stride, k_per_split, M_BUCKET,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, X_DTYPE: tl.constexpr,
                INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[split, m, n] = sum over this split's k of x[m, k] * w[n, k]   (grid: M, N / BLOCK_N, SPLIT_K)."""
    row, block_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    k_start = split * k_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + k0 + tl.arange(0, BLOCK_K)  # (BK,)
        in_k = (offs_k < K) & (offs_k < k_start + k_per_split)
        x = tl.load(x_ptr + row * x_stride + offs_k, mask=in_k, other=0.0).to(tl.float32)  # (BK,)
        row_mask = offs_n[:, None] < N  # (BN, 1)
        mask = row_mask & in_k[None, :]
        # "% K": a tile wholly past K (last slice) reads a valid scale; its x is 0, so it adds nothing
        k_first = (k_start + k0) % K
        w = _dequantize(packed_ptr, scales_ptr, zeros_ptr, offs_n[:, None], offs_k[None, :], k_first, row_mask, mask,
                        packed_stride, groups_stride, GROUP_SIZE, HAS_ZEROS, BLOCK_K)  # (BN, BK) fp32
        w = _round_to(w, X_DTYPE, INTERPRET).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(partial_ptr + (split * M + row) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def gemm_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, x_stride, packed_stride,
                groups_stride, M_BUCKET,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, X_DTYPE: tl.constexpr,
                INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for one (BLOCK_M, BLOCK_N) tile (grid: M / BM, N / BN)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :], mask=x_mask, other=0.0)  # (BM, BK)
        row_mask = offs_n[None, :] < N  # (1, BN)
        w_mask = (offs_k[:, None] < K) & row_mask
        w = _dequantize(packed_ptr, scales_ptr, zeros_ptr, offs_n[None, :], offs_k[:, None], k0, row_mask, w_mask,
                        packed_stride, groups_stride, GROUP_SIZE, HAS_ZEROS, BLOCK_K)  # (BK, BN) fp32
        w = _round_to(w, X_DTYPE, INTERPRET)
        if INTERPRET:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        elif X_DTYPE == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], _round_to(acc, X_DTYPE, INTERPRET), mask=out_mask)


# Modest GPU configs; the interpreter uses the first-listed small one instead of autotuning.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps)
    for block_n, block_k, warps in ((32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 8), (16, 256, 2))
]
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in (
        (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 4), (64, 128, 32, 4, 4),
    )
]
INTERPRETER_GEMV_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128}
INTERPRETER_GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}
_TUNING_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE"]
_autotuned: dict[str, object] = {}


def _launcher(name: str):
    """The kernel to launch: autotuned on a GPU, the raw kernel (fixed config) in the interpreter."""
    if INTERPRET:
        return gemv_kernel if name == "gemv" else gemm_kernel
    if name not in _autotuned:
        kernel, configs = (gemv_kernel, GEMV_CONFIGS) if name == "gemv" else (gemm_kernel, GEMM_CONFIGS)
        _autotuned[name] = triton.autotune(configs=configs, key=_TUNING_KEY)(kernel)
    return _autotuned[name]


def _check_device(x: Tensor, weight: PackedInt4Weight) -> None:
    if x.dtype not in _TORCH_TO_TRITON:
        raise TypeError(f"the Triton int4 kernels take float16, bfloat16 or float32 activations, got {x.dtype}")
    if x.device != weight.packed.device:
        raise ValueError(f"x is on {x.device} but the weights are on {weight.packed.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton int4 kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def _split_k(rows: int, weight: PackedInt4Weight, x: Tensor) -> int:
    """Enough K slices that (M x N/64 x slices) programs cover the GPU about twice."""
    if INTERPRET:
        return 2 if weight.in_features >= 2 * SPLIT_K_QUANTUM else 1
    programs = rows * triton.cdiv(weight.out_features, 64)
    target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(triton.cdiv(target, programs), weight.in_features // SPLIT_K_QUANTUM))


def _common_args(weight: PackedInt4Weight) -> tuple[Tensor, Tensor, Tensor]:
    """packed, scales, zeros as contiguous tensors (scales stand in for zeros, never read, if there are none)."""
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    return weight.packed.contiguous(), weight.scales.contiguous(), zeros.contiguous()


def linear_gemv(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias with the split-K GEMV kernel (any M; meant for M <= GEMV_MAX_M)."""
    _check_device(x, weight)
    rows_x = x.reshape(-1, weight.in_features).contiguous()  # (M, K)
    rows, n, k = rows_x.shape[0], weight.out_features, weight.in_features
    split = _split_k(rows, weight, x)
    k_per_split = triton.cdiv(triton.cdiv(k, split), SPLIT_K_QUANTUM) * SPLIT_K_QUANTUM
    split = triton.cdiv(k, k_per_split)
    partial = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)  # (SPLIT_K, M, N)
    packed, scales, zeros = _common_args(weight)
    extra = INTERPRETER_GEMV_CONFIG if INTERPRET else {}

    def grid(meta):
        return (rows, triton.cdiv(n, meta["BLOCK_N"]), split)

    if rows:
        _launcher("gemv")[grid](
            rows_x, packed, scales, zeros, partial, rows, n, k, rows_x.stride(0), k // 2,
            k // weight.group_size, k_per_split, triton.next_power_of_2(rows),
            GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, X_DTYPE=_TORCH_TO_TRITON[x.dtype],
            INTERPRET=INTERPRET, **extra,
        )
    out = partial.sum(dim=0)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def linear_gemm(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias with the fused tensor-core GEMM kernel (any M; meant for medium M)."""
    _check_device(x, weight)
    rows_x = x.reshape(-1, weight.in_features).contiguous()  # (M, K)
    rows, n, k = rows_x.shape[0], weight.out_features, weight.in_features
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    packed, scales, zeros = _common_args(weight)
    bias_arg = bias.contiguous() if bias is not None else scales  # never read when HAS_BIAS is False
    extra = INTERPRETER_GEMM_CONFIG if INTERPRET else {}

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    if rows:
        _launcher("gemm")[grid](
            rows_x, packed, scales, zeros, bias_arg, out, rows, n, k, rows_x.stride(0), k // 2,
            k // weight.group_size, triton.next_power_of_2(rows),
            GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
            X_DTYPE=_TORCH_TO_TRITON[x.dtype], INTERPRET=INTERPRET, **extra,
        )
    return out.reshape(*x.shape[:-1], n)


def linear_auto(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """GEMV for M <= GEMV_MAX_M, fused GEMM up to GEMM_MAX_M, dequantize + dense matmul above."""
    rows = x.numel() // weight.in_features
    if rows <= GEMV_MAX_M:
        return linear_gemv(x, weight, bias)
    if rows <= GEMM_MAX_M:
        return linear_gemm(x, weight, bias)
    dense = dequantize_int4(weight.packed, weight.scales, weight.zeros, weight.group_size).to(x.dtype)
    return torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
