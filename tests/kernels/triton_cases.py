"""Triton kernels against the reference; run by test_triton.py in a subprocess.

Not collected by the main pytest run (the name does not start with test_): Triton's
interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported, so
test_triton.py starts `pytest tests/kernels/triton_cases.py` with it set (CPU tensors), and
once more without it on a machine with CUDA (GPU tensors, compiled and autotuned kernels).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from qat.kernels import triton_int4
from qat.kernels.dispatch import int4_linear, prepare_weights
from qat.kernels.reference import int4_linear_reference

from tests.kernels.helpers import (
    TOLERANCES,
    assert_bitwise_equal,
    assert_within_bound,
    error_bound,
    make_exact_case,
    make_layer,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("neither TRITON_INTERPRET=1 nor a CUDA device", allow_module_level=True)
assert triton_int4.INTERPRET == INTERPRETED, "triton was imported before TRITON_INTERPRET was set"

# triton_gemv is the backend (the GEMV's default form); triton_gemv_exact / _unrounded are its two forms
# called directly (weights rounded to x's dtype as the reference does, or not).
KERNELS = ("triton_gemv", "triton_gemv_unrounded", "triton_gemm")
GEMV_FORMS = {"triton_gemv_exact": True, "triton_gemv_unrounded": False}


def _tolerance(kernel, dtype):
    if kernel == "triton_gemv":
        kernel = "triton_gemv_exact" if triton_int4.GEMV_EXACT else "triton_gemv_unrounded"
    return TOLERANCES[kernel, dtype]


def _run(kernel, x, packed, scales, zeros, group_size, bias=None):
    """`kernel` on DEVICE (inputs moved there), the result back on the CPU."""
    x, packed, scales, zeros, bias = (t if t is None else t.to(DEVICE) for t in (x, packed, scales, zeros, bias))
    if kernel in GEMV_FORMS:
        weight = prepare_weights(packed, scales, zeros, group_size)
        return triton_int4.linear_gemv(x, weight, bias, exact=GEMV_FORMS[kernel]).cpu()
    return int4_linear(x, packed, scales, zeros, group_size, bias, backend=kernel).cpu()


def _check(kernel, x, packed, scales, zeros, group_size, bias, label):
    """Run `kernel` on DEVICE, compare with the CPU reference within the tolerance table's bound."""
    actual = _run(kernel, x, packed, scales, zeros, group_size, bias)
    expected = int4_linear_reference(x, packed, scales, zeros, group_size, bias)
    bound = error_bound(x, packed, scales, zeros, group_size, bias, _tolerance(kernel, x.dtype))
    assert_within_bound(actual, expected, bound, label)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", (1, 3, 17, 64))
@pytest.mark.parametrize("group", (32, 64, 128, "per-channel"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_kernel_within_tolerance(kernel, rows, group, dtype):
    n, k = 48, 256
    group_size = k if group == "per-channel" else group
    packed, scales, zeros = make_layer(n, k, group_size, dtype, zero_points=group != 64, seed=rows)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype) if rows in (3, 64) else None
    _check(kernel, x, packed, scales, zeros, group_size, bias, f"{kernel} {dtype} M={rows} group={group}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_kernel_is_bitwise_exact_when_the_arithmetic_is(kernel, dtype):
    """Dyadic scales, integer activations: a single misplaced code, scale or zero would show."""
    for zero_points in (True, False):
        x, packed, scales, zeros = make_exact_case(48, 512, 32, rows=5, dtype=dtype)
        zeros = zeros if zero_points else None
        scales = scales.to(dtype)
        actual = _run(kernel, x, packed, scales, zeros, 32)
        assert_bitwise_equal(actual, int4_linear_reference(x, packed, scales, zeros, 32), f"{kernel} {dtype}")


@pytest.mark.parametrize(
    ("kernel", "rows", "k", "group_size"),
    (("triton_gemv", 3, 4160, 64), ("triton_gemv_exact", 3, 4160, 64), ("triton_gemm", 17, 4160, 64),
     ("triton_gemv", 1, 640, 128), ("triton_gemv", 6, 576, 576), ("triton_gemm", 17, 4192, 32),
     ("triton_gemv_unrounded", 1, 4192, 32)),
)
def test_awkward_shape(kernel, rows, k, group_size):
    """N = 48 (not a multiple of any block: rows past N are clamped, never stored); K = 4160 = 65 groups
    of 64, or 640: K slices whose last one runs past K (tiles wholly beyond K must add nothing, with one
    scale per tile or per column); K = 576 per channel (SmolLM2's width, not a power of two) with M = 6:
    two row blocks, the second partly empty; K = 4192: a last tile partly past K (the masked loads)."""
    packed, scales, zeros = make_layer(48, k, group_size, torch.bfloat16, seed=1)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    _check(kernel, x, packed, scales, zeros, group_size, None, f"{kernel} 48x{k}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_fp32_activations(kernel):
    packed, scales, zeros = make_layer(40, 256, 128, torch.float16, seed=2)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    _check(kernel, x, packed, scales, zeros, 128, torch.randn(40), f"{kernel} fp32")


def test_auto_path_crosses_over_by_rows():
    packed, scales, zeros = make_layer(32, 128, 32, torch.bfloat16, seed=3)
    for rows in (1, triton_int4.GEMV_MAX_M + 1, triton_int4.GEMM_MAX_M + 1):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
        on_device = [t.to(DEVICE) for t in (x, packed, scales, zeros)]
        actual = int4_linear(*on_device, 32, backend="triton").cpu()
        kernel = "triton_gemv" if rows == 1 else "triton_gemm"  # the dense path is exact: within either bound
        bound = error_bound(x, packed, scales, zeros, 32, None, _tolerance(kernel, x.dtype))
        assert_within_bound(actual, int4_linear_reference(x, packed, scales, zeros, 32), bound, f"auto M={rows}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_worst_case_accumulation_against_float64(kernel):
    """Every product at its largest and of one sign over the largest K tested: no overflow, and the
    fp16 result within its bound of the exact float64 value."""
    n, k, group_size = 32, 4096, 128
    packed = torch.full((n, k // 2), 0xFF, dtype=torch.uint8)  # every code 15
    zeros = torch.zeros(n, k // group_size, dtype=torch.uint8)  # w = 15 * scale, the largest
    scales = torch.full((n, k // group_size), 2.0**-4, dtype=torch.float16)
    x = torch.full((2, k), 1.0, dtype=torch.float16)  # y = 4096 * 15 / 16 = 3840
    x[1, 1::2] = -1.0  # second row cancels exactly to 0
    actual = _run(kernel, x, packed, scales, zeros, group_size).double()
    expected = torch.tensor([[3840.0] * n, [0.0] * n], dtype=torch.float64)
    assert torch.equal(actual, expected)


def test_autotune_prune_keeps_configs_with_one_scale_per_row_and_no_masks():
    """The GPU autotuner only sees configs whose BLOCK_K divides the group size and whose tiles lie inside K
    (K = 4096, groups of 128); when none fits (K = 4160 in groups of 64), those whose slices hold a tile."""
    def described(configs):
        return {(c.kwargs["BLOCK_K"], c.kwargs.get("SPLIT_K", 1)) for c in configs}

    for configs in (triton_int4.GEMV_CONFIGS, triton_int4.GEMM_CONFIGS):
        kept = triton_int4._prune(configs, {"K": 4096}, GROUP_SIZE=128)
        assert kept and all(128 % bk == 0 and 4096 % (bk * split) == 0 for bk, split in described(kept))
        assert described(kept) == {(bk, split) for bk, split in described(configs)
                                   if 128 % bk == 0 and 4096 % (bk * split) == 0}
        uneven = triton_int4._prune(configs, {"K": 4160}, GROUP_SIZE=64)
        assert uneven and all(64 % bk == 0 and bk * split <= 4160 for bk, split in described(uneven))
    per_channel = triton_int4._prune(triton_int4.GEMV_CONFIGS, {"K": 96}, GROUP_SIZE=96)  # no BLOCK_K divides 96
    assert described(per_channel) == {(min(bk for bk, _ in described(triton_int4.GEMV_CONFIGS)), 1)}
