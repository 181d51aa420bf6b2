"""Fused unpack + dequantize + matmul for int4 weights (W4A16) in Triton, and their launchers.

Both kernels read the canonical layout directly (reference.py): byte k // 2 of row n holds
code k in its low nibble when k is even, high nibble when odd, so no repack is needed. Codes
become floats without an int -> float conversion (a quarter-rate instruction on NVIDIA GPUs):
the nibble is OR-ed into the mantissa of a float constant ("magic number"), and the constant
is folded into the scale. Rows past N are clamped into the layer (their results are not
stored) and, when the tile size divides K, nothing is masked along K, so loads vectorize.

* `gemv_kernel` (M = 1; any M works): one program per (up to 4 rows of x, BLOCK_N outputs,
  slice of K); each weight byte is read once for all of the program's rows, and the weights are
  formed in fp32 exactly as the reference forms them (`_weight_halves`). For one row, x is split
  into even and odd k to meet the two nibbles of each byte; for more, the nibbles are interleaved.
  The exact form (default) then rounds them to x's dtype as the reference does; `exact=False`
  skips that rounding (one instruction fewer per weight; the result then differs from the
  reference by that rounding, see tests/kernels/helpers.py). K slices ("split-K", SPLIT_K in
  the config) give enough programs to fill the GPU when N is small; with one slice the kernel
  writes y itself, else fp32 partial sums go to a (SPLIT_K, M, N) buffer summed on the host
  (deterministic, no atomics).
* `gemm_kernel` (M >= 2): (BLOCK_M, BLOCK_N) output tiles, split-K as in the GEMV; the same
  weights, rounded to x's dtype, fed to tl.dot (tensor cores) with fp32 accumulation.
* Above `GEMM_MAX_M` the weight is dequantized once and the dense matmul runs (on an H200 the
  fused GEMM was faster than that at every M measured, up to 1024).

On a GPU the kernels are autotuned per (M bucket, N, K, group size); configs whose BLOCK_K
does not divide the group size are dropped where others remain (then a tile shares one scale
per row). Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors), and on a GPU with
QAT_TRITON_AUTOTUNE=0, they run one fixed small config. Two interpreter gaps are worked
around behind the INTERPRET constexpr: its tl.dot multiplies bf16 bit patterns as integers
(so operands go to fp32 first: bf16 x bf16 products are exact in fp32, as on tensor cores),
and its fp32 -> bf16 cast truncates (so rounding to nearest even is done with integer ops).
GPU figures: benchmarks/kernels/kernels_gpu.md.

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
# QAT_TRITON_AUTOTUNE=0: run the fixed config on the GPU too (no tuning; the GPU test run uses it)
AUTOTUNE = not INTERPRET and os.environ.get("QAT_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off")
GEMV_MAX_M = 1  # GEMV for one row; the tensor-core GEMM was faster from M = 2 on an H200 (kernels_gpu.md)
GEMM_MAX_M = 4096  # fused GEMM above that; dequantize + dense matmul above this (slower at every M measured)
GEMV_ROWS = 4  # rows of x per GEMV program
GEMV_EXACT = True  # the GEMV rounds the weights to x's dtype as the reference does (module docstring)

_TORCH_TO_TRITON = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_MAGIC_ONE = tl.constexpr(0x3F800000)  # 1.0f: OR-ing a code into bits 19..22 gives 1 + code / 16
_MAGIC_2_23 = tl.constexpr(0x4B000000)  # 2**23 as fp32: OR-ing a code into bits 0..3 gives 2**23 + code
_NIBBLE_AT_19 = tl.constexpr(0x780000)  # 0xF << 19


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
def _group_scale_zero(scales_ptr, zeros_ptr, rows, k, k_block, groups_stride,
                      GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 scale and zero of the group of each k (k broadcasts against rows; zero 8 without zero points).

    Rows are clamped into the layer by the caller and k stays inside K, so no mask is needed. When
    BLOCK_K divides the group size, a tile starting at k_block (a multiple of BLOCK_K) lies in one
    group: one scale (and zero) per row is loaded, shaped like `rows`. Otherwise one per element.
    """
    if GROUP_SIZE % BLOCK_K == 0:
        offsets = rows * groups_stride + k_block // GROUP_SIZE
    else:
        offsets = rows * groups_stride + k // GROUP_SIZE
    scale = tl.load(scales_ptr + offsets).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + offsets).to(tl.float32)
    else:
        zero = 8.0
    return scale, zero


@triton.jit
def _weight_halves(packed_ptr, scales_ptr, zeros_ptr, rows, k0, K, byte_mask, packed_stride, groups_stride,
                   GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, SCALES_FP32: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The fp32 weights of codes k0 + 2j and k0 + 2j + 1 (two (BN, BLOCK_K // 2) tiles), the reference's bit for bit.

    rows: (BN, 1) row indices inside the layer. One byte load per two codes (contiguous, vectorized when
    EVEN_K: no mask); each nibble is OR-ed into a float's mantissa. With 16-bit scales
    w = (1 + code/16) * 16 s - (16 + zero) s in one fused multiply-add: both products are exact in fp32,
    so its single rounding is the reference's. fp32 scales would make them inexact: there
    w = ((2**23 + code) - (2**23 + zero)) * s, also one rounding.
    """
    offs_j = tl.arange(0, BLOCK_K // 2)[None, :]  # (1, BJ)
    at = packed_ptr + rows * packed_stride + k0 // 2 + offs_j
    if EVEN_K:
        byte = tl.load(at).to(tl.int32)  # (BN, BJ)
    else:
        byte = tl.load(at, mask=byte_mask, other=0).to(tl.int32)  # codes past K read as 0 (x is 0 there)
    k_even = tl.minimum(k0 + 2 * offs_j, K - 1)  # (1, BJ); codes 2j and 2j + 1 share a group (sizes are even)
    scale, zero = _group_scale_zero(scales_ptr, zeros_ptr, rows, k_even, k0, groups_stride, GROUP_SIZE, HAS_ZEROS,
                                    BLOCK_K)
    if SCALES_FP32:
        offset = 8388608.0 + zero
        low = ((byte & 0xF | _MAGIC_2_23).to(tl.float32, bitcast=True) - offset) * scale  # 2**23 + code - ...
        high = ((byte >> 4 | _MAGIC_2_23).to(tl.float32, bitcast=True) - offset) * scale
    else:
        step, offset = 16.0 * scale, -((16.0 + zero) * scale)
        low = tl.fma(((byte << 19) & _NIBBLE_AT_19 | _MAGIC_ONE).to(tl.float32, bitcast=True), step, offset)
        high = tl.fma(((byte << 15) & _NIBBLE_AT_19 | _MAGIC_ONE).to(tl.float32, bitcast=True), step, offset)
    return low, high


@triton.jit
def _weights(packed_ptr, scales_ptr, zeros_ptr, rows, k0, K, byte_mask, packed_stride, groups_stride,
             GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, SCALES_FP32: tl.constexpr, BLOCK_K: tl.constexpr,
             EVEN_K: tl.constexpr):
    """The fp32 weights w[rows, k0 : k0 + BLOCK_K] in k order (the two halves interleaved): (BN, BLOCK_K)."""
    low, high = _weight_halves(packed_ptr, scales_ptr, zeros_ptr, rows, k0, K, byte_mask, packed_stride,
                               groups_stride, GROUP_SIZE, HAS_ZEROS, SCALES_FP32, BLOCK_K, EVEN_K)
    return tl.interleave(low, high)


@triton.jit
def _store(y, offs_m, offs_n, split, M, N, bias_ptr, out_ptr, partial_ptr, HAS_BIAS: tl.constexpr,
           SPLIT_K: tl.constexpr, X_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Write a (rows, BN) fp32 tile: with one K slice y + bias in x's dtype to out (M, N); else the fp32
    partial sum to partial[split] (the host adds the slices and the bias). Rows past M, N are not written."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], _round_to(y, X_DTYPE, INTERPRET), mask=mask)
    else:
        tl.store(partial_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], y, mask=mask)


def _even_k(args: dict) -> bool:
    """Whether every tile lies inside K (then loads need no mask along K, and vectorize)."""
    return args["K"] % (args["BLOCK_K"] * args.get("SPLIT_K", 1)) == 0


@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def gemv_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, x_stride,
                packed_stride, groups_stride, M_BUCKET,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALES_FP32: tl.constexpr,
                X_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, ROUND_W: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * w[n, k] over this program's K slice   (grid: M / ROWS, N / BN, SPLIT_K)."""
    block_m, block_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_r = block_m * ROWS + tl.arange(0, ROWS)  # (R,)
    rows = (offs_n % N)[:, None]  # (BN, 1) clamped into the layer: loads need no row mask, stores have one
    x_rows = x_ptr + (offs_r % M)[:, None] * x_stride  # (R, 1)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    if ROWS == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)  # summed over k once, after the loop
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)[None, :]  # (1, BK)
        if EVEN_K:
            x = tl.load(x_rows + offs_k).to(tl.float32)  # (R, BK)
        else:
            x = tl.load(x_rows + offs_k, mask=offs_k < k_stop, other=0.0).to(tl.float32)  # 0 past the slice
        byte_mask = (k0 + 2 * tl.arange(0, BLOCK_K // 2)[None, :]) < k_stop
        if ROWS == 1:  # x split into even and odd k: the weights stay as loaded, no interleave
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))  # (BJ,) each
            low, high = _weight_halves(packed_ptr, scales_ptr, zeros_ptr, rows, k0, K, byte_mask, packed_stride,
                                       groups_stride, GROUP_SIZE, HAS_ZEROS, SCALES_FP32, BLOCK_K, EVEN_K)
            if ROUND_W:
                low = _round_to(low, X_DTYPE, INTERPRET).to(tl.float32)
                high = _round_to(high, X_DTYPE, INTERPRET).to(tl.float32)
            acc += low * x_even[None, :] + high * x_odd[None, :]
        else:
            w = _weights(packed_ptr, scales_ptr, zeros_ptr, rows, k0, K, byte_mask, packed_stride, groups_stride,
                         GROUP_SIZE, HAS_ZEROS, SCALES_FP32, BLOCK_K, EVEN_K)  # (BN, BK) fp32
            if ROUND_W:
                w = _round_to(w, X_DTYPE, INTERPRET).to(tl.float32)
            acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
    if ROWS == 1:
        y = tl.sum(acc, axis=1)[None, :]  # (1, BN)
    else:
        y = acc  # (R, BN)
    _store(y, offs_r, offs_n, split, M, N, bias_ptr, out_ptr, partial_ptr, HAS_BIAS, SPLIT_K, X_DTYPE, INTERPRET)


@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def gemm_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, x_stride,
                packed_stride, groups_stride, M_BUCKET,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALES_FP32: tl.constexpr,
                X_DTYPE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for one (BLOCK_M, BLOCK_N) tile and K slice
    (grid: M / BM, N / BN, SPLIT_K); several slices write fp32 partial sums, as in the GEMV."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    split = tl.program_id(2)
    rows = (offs_n % N)[:, None]  # (BN, 1) clamped: loads need no row mask
    x_rows = x_ptr + (offs_m % M)[:, None] * x_stride  # (BM, 1)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)[None, :]  # (1, BK)
        if EVEN_K:
            x = tl.load(x_rows + offs_k)  # (BM, BK)
        else:
            x = tl.load(x_rows + offs_k, mask=offs_k < k_stop, other=0.0)  # 0 past the slice: adds nothing
        byte_mask = (k0 + 2 * tl.arange(0, BLOCK_K // 2)[None, :]) < k_stop
        w = _weights(packed_ptr, scales_ptr, zeros_ptr, rows, k0, K, byte_mask, packed_stride, groups_stride,
                     GROUP_SIZE, HAS_ZEROS, SCALES_FP32, BLOCK_K, EVEN_K)  # (BN, BK) fp32
        w = tl.trans(_round_to(w, X_DTYPE, INTERPRET))  # (BK, BN), rounded as the reference rounds it
        if INTERPRET:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        elif X_DTYPE == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    _store(acc, offs_m, offs_n, split, M, N, bias_ptr, out_ptr, partial_ptr, HAS_BIAS, SPLIT_K, X_DTYPE, INTERPRET)


# GPU configs, pruned per call by `_prune` and then autotuned; without autotuning, `_fixed_config`.
# Large tiles (up to 256 rows x 128 codes: 16 KiB of packed weights per step) keep enough bytes in flight per
# SM; K slices fill the 132 SMs of an H200 when N / BLOCK_N alone would not.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split}, num_warps=warps)
    for block_n, block_k, warps in ((16, 128, 4), (32, 128, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8),
                                    (256, 128, 8), (64, 64, 4), (16, 256, 4))
    for split in (1, 2, 4)
]
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in (
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 256, 64, 8, 3), (32, 128, 128, 4, 3), (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    )
    for split in (1, 2, 4)
]
MAX_SPLIT_K = max(config.kwargs["SPLIT_K"] for config in GEMV_CONFIGS + GEMM_CONFIGS)
_TUNING_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "ROUND_W"]
_autotuned: dict[str, object] = {}


def _prune(configs, named_args, **kwargs):
    """Keep configs whose BLOCK_K divides the group size (one scale per tile row) and whose tiles all lie
    inside K (no masks); failing that, those whose K slices each hold a tile; else the smallest BLOCK_K."""
    arguments = {**named_args, **kwargs}
    group_size, k = arguments["GROUP_SIZE"], arguments["K"]
    fits = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0
            and c.kwargs.get("SPLIT_K", 1) * c.kwargs["BLOCK_K"] <= max(k, c.kwargs["BLOCK_K"])]
    even = [c for c in fits if _even_k({"K": k, **c.kwargs})]
    if even or fits:
        return even or fits
    smallest = min(c.kwargs["BLOCK_K"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_K"] == smallest and c.kwargs.get("SPLIT_K", 1) == 1]


def _fixed_config(name: str, k: int) -> dict:
    """The config without autotuning: small tiles; two K slices when K allows, so both GEMV outputs run."""
    split = 2 if k >= 512 else 1
    if name == "gemv":
        return {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": split}
    return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": split}


def _launcher(name: str):
    """The kernel to launch: autotuned, or the raw kernel (run with `_fixed_config`)."""
    if not AUTOTUNE:
        return gemv_kernel if name == "gemv" else gemm_kernel
    if name not in _autotuned:
        kernel, configs = (gemv_kernel, GEMV_CONFIGS) if name == "gemv" else (gemm_kernel, GEMM_CONFIGS)
        key = _TUNING_KEY if name == "gemv" else _TUNING_KEY[:-1]
        _autotuned[name] = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(
            kernel)
    return _autotuned[name]


def _check_device(x: Tensor, weight: PackedInt4Weight) -> None:
    if x.dtype not in _TORCH_TO_TRITON:
        raise TypeError(f"the Triton int4 kernels take float16, bfloat16 or float32 activations, got {x.dtype}")
    if x.device != weight.packed.device:
        raise ValueError(f"x is on {x.device} but the weights are on {weight.packed.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton int4 kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def _common_args(weight: PackedInt4Weight) -> tuple[Tensor, Tensor, Tensor]:
    """packed, scales, zeros as contiguous tensors (scales stand in for zeros, never read, if there are none)."""
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    return weight.packed.contiguous(), weight.scales.contiguous(), zeros.contiguous()


def linear_gemv(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None,
                exact: Optional[bool] = None) -> Tensor:
    """y = x @ W.T + bias with the GEMV kernel (any M; meant for M <= GEMV_MAX_M).

    `exact`: round the weights to x's dtype as the reference does (module docstring); None: GEMV_EXACT.
    """
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    return _launch("gemv", "ROWS", x, weight, bias, ROUND_W=GEMV_EXACT if exact is None else exact,
                   ROWS=min(GEMV_ROWS, triton.next_power_of_2(max(rows, 1))))


def linear_gemm(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias with the fused tensor-core GEMM kernel (any M; meant for M > GEMV_MAX_M)."""
    return _launch("gemm", "BLOCK_M", x, weight, bias)


def _launch(name: str, rows_per_program: str, x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor],
            **constexprs) -> Tensor:
    """Run kernel `name` over x's rows (`rows_per_program`: the meta key giving a program's rows of x)."""
    _check_device(x, weight)
    rows_x = x.reshape(-1, weight.in_features).contiguous()  # (M, K)
    rows, n, k = rows_x.shape[0], weight.out_features, weight.in_features
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*x.shape[:-1], n)
    partial = torch.empty(MAX_SPLIT_K, rows, n, dtype=torch.float32, device=x.device)  # (SPLIT_K, M, N)
    packed, scales, zeros = _common_args(weight)
    bias_arg = bias.contiguous() if bias is not None else scales  # never read when HAS_BIAS is False
    extra = {} if AUTOTUNE else _fixed_config(name, k)

    def grid(meta):
        return (triton.cdiv(rows, meta[rows_per_program]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    launcher = _launcher(name)
    launcher[grid](
        rows_x, packed, scales, zeros, bias_arg, out, partial, rows, n, k, rows_x.stride(0), k // 2,
        k // weight.group_size, triton.next_power_of_2(rows),
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        SCALES_FP32=weight.scales.dtype == torch.float32, X_DTYPE=_TORCH_TO_TRITON[x.dtype], INTERPRET=INTERPRET,
        **constexprs, **extra,
    )
    return _finish(out, partial, launcher, extra, bias).reshape(*x.shape[:-1], n)


def _finish(out: Tensor, partial: Tensor, launcher, extra: dict, bias: Optional[Tensor]) -> Tensor:
    """`out` as the kernel wrote it (one K slice), or the sum of the slices' fp32 partials, + bias, in out's dtype."""
    split = launcher.best_config.kwargs["SPLIT_K"] if AUTOTUNE else extra["SPLIT_K"]
    if split == 1:
        return out
    summed = partial[:split].sum(dim=0)
    if bias is not None:
        summed += bias.float()
    return summed.to(out.dtype)


def linear_auto(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """GEMV for M <= GEMV_MAX_M, fused GEMM up to GEMM_MAX_M, dequantize + dense matmul above."""
    rows = x.numel() // weight.in_features
    if rows <= GEMV_MAX_M:
        return linear_gemv(x, weight, bias)
    if rows <= GEMM_MAX_M:
        return linear_gemm(x, weight, bias)
    dense = dequantize_int4(weight.packed, weight.scales, weight.zeros, weight.group_size).to(x.dtype)
    return torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
