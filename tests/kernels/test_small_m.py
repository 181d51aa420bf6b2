"""The small-M CPU kernel (kernels/small_m.py, kernels/csrc/small_m_bf16.cpp) against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from qat.kernels import small_m
from qat.kernels.dispatch import int4_linear
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

if small_m.small_m_unsupported(torch.zeros(1, 64), PackedInt4Weight(*make_layer(16, 64, 32), 32)) is not None:
    pytest.skip("the small-M kernel cannot run here (no C++ compiler or no AVX-512 BF16)", allow_module_level=True)

# (N, K, group): odd N (blocks of 4 output rows plus a tail), K not a multiple of 256 (4160: 8 segments of 512 k
# and a partial one), groups of 32 (two groups per 64-k chunk) / 64 / 128 / 256, groups of 96 (chunks straddle two
# groups) and 384 (spans a segment boundary), one output row
SHAPES = ((47, 320, 32), (33, 384, 128), (64, 4160, 64), (17, 512, 256), (40, 384, 384), (9, 576, 96), (1, 128, 32))
ROWS = (1, 3, 4, 9, 16, 40, 70)  # register tiles of 4 rows plus tails; above 64 rows: several kernel calls


def _param(shape, scale_dtype, zero_points):
    name = f"{shape[0]}x{shape[1]}g{shape[2]}-{str(scale_dtype)[6:]}-{'asym' if zero_points else 'sym'}"
    return pytest.param(shape, scale_dtype, zero_points, id=name)


def _cases():
    """Every scale dtype and zero-point form over the shapes, and every shape asymmetric with fp16 scales."""
    forms = itertools.product((torch.float16, torch.bfloat16, torch.float32), (True, False))
    spread = [_param(shape, scale_dtype, zero_points) for shape, (scale_dtype, zero_points)
              in zip(itertools.cycle(SHAPES), forms)]
    return spread + [_param(shape, torch.float16, True) for shape in SHAPES if _param(shape, torch.float16, True).id
                     not in {case.id for case in spread}]


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize(("shape", "scale_dtype", "zero_points"), _cases())
def test_small_m_within_tolerance(x_dtype, shape, scale_dtype, zero_points):
    n, k, group = shape
    packed, scales, zeros = make_layer(n, k, group, scale_dtype, zero_points, seed=k + n)
    generator = torch.Generator().manual_seed(n)
    bias = torch.randn(n, generator=generator).to(x_dtype) if zero_points else None
    weight = PackedInt4Weight(packed, scales, zeros, group, bias)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=generator).to(x_dtype)
        actual = small_m.linear_small_m(x, weight, bias)
        expected = int4_linear_reference(x, packed, scales, zeros, group, bias)
        bound = error_bound(x, packed, scales, zeros, group, bias, TOLERANCES["cpu_small_m", x_dtype])
        assert_within_bound(actual, expected, bound, f"cpu_small_m x {x_dtype} M={rows}")


@pytest.mark.parametrize("rows", (1, 5, 8, 21, 67))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
def test_small_m_is_bitwise_exact_when_the_arithmetic_is(rows, x_dtype):
    """Exact weights, products and sums: a misplaced code, lane, zero, scale or x pair cannot hide in a tolerance."""
    for n, k, group in ((40, 256, 64), (19, 384, 128), (16, 512, 256), (23, 192, 32), (5, 576, 96)):
        x, packed, scales, zeros = make_exact_case(n, k, group, rows=rows, dtype=x_dtype, seed=rows)
        weight = PackedInt4Weight(packed, scales, zeros, group)
        assert_bitwise_equal(small_m.linear_small_m(x, weight), int4_linear_reference(x, packed, scales, zeros, group),
                             f"{n}x{k} g{group} M={rows}")


def test_float_qparams_are_the_scales_and_zeros_in_float32_with_8_for_symmetric_layers():
    packed, scales, zeros = make_layer(20, 64, 32)
    got_scales, got_zeros = small_m.float_qparams(PackedInt4Weight(packed, scales, zeros, 32))
    assert torch.equal(got_scales, scales.float()) and torch.equal(got_zeros, zeros.float())
    _, symmetric_zeros = small_m.float_qparams(PackedInt4Weight(packed, scales, None, 32))
    assert symmetric_zeros.shape == (20, 2) and (symmetric_zeros == 8).all()


def test_small_m_keeps_leading_dimensions_empty_batches_and_dispatch_runs_it():
    packed, scales, zeros = make_layer(24, 128, 32)
    weight = PackedInt4Weight(packed, scales, zeros, 32)
    x = torch.randn(2, 3, 128)
    y = small_m.linear_small_m(x, weight)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    assert small_m.linear_small_m(x[:0], weight).shape == (0, 3, 24)
    assert_bitwise_equal(int4_linear(x, packed, scales, zeros, 32, backend="cpu_small_m"), y)


@pytest.mark.parametrize("group", (3, 16, 48))
def test_small_m_refuses_group_sizes_that_are_not_multiples_of_32(group):
    packed, scales, zeros = make_layer(8, 96, group)
    with pytest.raises(ValueError, match=rf"cpu_small_m.*multiple of 32, got {group}"):
        int4_linear(torch.randn(1, 96), packed, scales, zeros, group, backend="cpu_small_m")


def test_small_m_refuses_k_not_a_multiple_of_64():
    packed, scales, zeros = make_layer(8, 96, 32)
    with pytest.raises(ValueError, match=r"cpu_small_m.*in_features \(K\) to be a multiple of 64, got 96"):
        int4_linear(torch.randn(1, 96), packed, scales, zeros, 32, backend="cpu_small_m")


def test_permute_chunks_orders_pairs_as_the_kernels_unpack_does():
    x = torch.arange(64.0).view(1, 64)  # one chunk: pair p = (2p, 2p + 1)
    pairs = small_m.permute_chunks(x).view(32, 2)[:, 0].div(2).long().tolist()
    assert pairs == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                     4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]


def test_the_kernel_checks_its_inputs():
    from qat.kernels.native import native_module

    weight = PackedInt4Weight(*make_layer(16, 64, 32), 32)
    scales, zeros = small_m.float_qparams(weight)
    kernel = native_module().small_m_bf16
    with pytest.raises(RuntimeError, match="x must be contiguous bf16"):
        kernel(torch.randn(1, 64), weight.packed, scales, zeros, 32)
    with pytest.raises(RuntimeError, match="1 to 64 rows, got 65"):
        kernel(torch.randn(65, 64).bfloat16(), weight.packed, scales, zeros, 32)
    with pytest.raises(RuntimeError, match="packed holds K = 64, x has K = 32"):
        kernel(torch.randn(1, 32).bfloat16(), weight.packed, scales, zeros, 32)
    odd = PackedInt4Weight(*make_layer(16, 96, 32), 32)
    with pytest.raises(RuntimeError, match="K must be a multiple of 64, got 96"):
        kernel(torch.randn(1, 96).bfloat16(), odd.packed, *small_m.float_qparams(odd), 32)
    with pytest.raises(RuntimeError, match="scales and zeros must be contiguous float32"):
        kernel(torch.randn(1, 64).bfloat16(), weight.packed, weight.scales, zeros, 32)
