"""The AVX2 float path for few rows (kernels/gemv_f32.py, kernels/csrc/gemv_f32_avx2.cpp) against the reference."""

from __future__ import annotations

import pytest
import torch
from qat.kernels import dispatch, gemv_f32
from qat.kernels.reference import int4_linear_reference
from qat.kernels.weights import PackedInt4Weight

from tests.kernels.helpers import (
    TOLERANCES,
    assert_bitwise_equal,
    assert_within_bound,
    error_bound,
    make_exact_case,
    make_layer,
)

if gemv_f32.gemv_f32_unsupported(torch.zeros(1, 64), PackedInt4Weight(*make_layer(16, 64, 32), 32)) is not None:
    pytest.skip("the AVX2 float kernel cannot run here (no C++ compiler or no AVX2)", allow_module_level=True)

# (N, K, group): N not a multiple of 16 (a panel's tail), groups of 8 (one chunk) to 256, K not a power of two
SHAPES = ((47, 256, 32), (33, 384, 128), (17, 4128, 96), (64, 512, 256), (1, 96, 8), (100, 576, 64))


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_within_the_documented_bound_of_the_reference(shape, scale_dtype, x_dtype):
    n, k, group = shape
    zero_points = scale_dtype != torch.bfloat16  # bf16 scales: a symmetric layer (zeros 8)
    packed, scales, zeros = make_layer(n, k, group, scale_dtype, zero_points, seed=n + k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(x_dtype)
    weight = PackedInt4Weight(packed, scales, zeros, group, bias)
    for rows in (1, 3, 8):
        x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).to(x_dtype)
        actual = dispatch.int4_linear_prepared(x, weight, backend="cpu_gemv_f32")
        expected = int4_linear_reference(x, packed, scales, zeros, group, bias)
        bound = error_bound(x, packed, scales, zeros, group, bias, TOLERANCES["cpu_gemv_f32", x_dtype])
        assert_within_bound(actual, expected, bound, f"cpu_gemv_f32 {shape} {x_dtype} M={rows}")


def test_bit_exact_where_every_product_and_sum_is_exact():
    """Power-of-two scales and small integer x: every step is exact, so one misplaced code or scale shows."""
    for n, k, group in ((40, 256, 64), (19, 96, 32)):
        x, packed, scales, zeros = make_exact_case(n, k, group, rows=2, dtype=torch.float32, seed=n)
        actual = dispatch.int4_linear(x, packed, scales, zeros, group, backend="cpu_gemv_f32")
        assert_bitwise_equal(actual, int4_linear_reference(x, packed, scales, zeros, group), f"{n}x{k}")


def test_the_bound_call_equals_the_dispatched_one():
    packed, scales, zeros = make_layer(50, 192, 64, seed=9)
    bias = torch.randn(50)
    weight = PackedInt4Weight(packed, scales, zeros, 64, bias)
    x = torch.randn(1, 192)
    run = dispatch.bind(x, weight, backend="cpu_gemv_f32")
    assert torch.equal(run(x), dispatch.int4_linear_prepared(x, weight, backend="cpu_gemv_f32"))


def test_offered_by_dispatch_for_few_rows_only():
    weight = PackedInt4Weight(*make_layer(64, 256, 64), 64)
    assert "cpu_gemv_f32" in dispatch.cpu_candidates(torch.zeros(1, 256), weight)
    assert "cpu_gemv_f32" in dispatch.cpu_candidates(torch.zeros(gemv_f32.MAX_ROWS, 256), weight)
    assert "cpu_gemv_f32" not in dispatch.cpu_candidates(torch.zeros(gemv_f32.MAX_ROWS + 1, 256), weight)


def test_group_sizes_that_are_not_multiples_of_8_are_refused_with_the_reason():
    weight = PackedInt4Weight(*make_layer(8, 60, 12), 12)
    reason = gemv_f32.gemv_f32_unsupported(torch.zeros(1, 60), weight)
    assert reason is not None and "multiple of 8" in reason and "12" in reason
