"""The CPU paths against the reference: exact ones bit for bit, cpu_int4pack within its bound."""

from __future__ import annotations

import pytest
import torch
from qat.kernels import cpu
from qat.kernels.dispatch import int4_linear
from qat.kernels.reference import dequantize_int4, int4_linear_reference
from qat.kernels.weights import PackedInt4Weight

from tests.kernels.helpers import (
    TOLERANCES,
    assert_bitwise_equal,
    assert_within_bound,
    error_bound,
    make_exact_case,
    make_layer,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPS = (32, 64, 128, "per-channel")
needs_int4pack = pytest.mark.skipif(not cpu.int4pack_available(), reason="no vectorized CPU int4pack kernel here")


def _case(n: int, k: int, group, zero_points: bool, scale_dtype=torch.float16, seed: int = 0):
    group_size = k if group == "per-channel" else group
    packed, scales, zeros = make_layer(n, k, group_size, scale_dtype, zero_points, seed)
    return packed, scales, zeros, group_size


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_dequantize_fast_is_bitwise_the_reference(group, scale_dtype):
    for zero_points in (True, False):
        packed, scales, zeros, group_size = _case(48, 256, group, zero_points, scale_dtype)
        assert_bitwise_equal(cpu.dequantize_fast(packed, scales, zeros, group_size),
                             dequantize_int4(packed, scales, zeros, group_size))


@pytest.mark.parametrize("backend", ("dequant", "dequant_cached"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 3, 17, 64))
def test_exact_paths_are_bitwise_the_reference(backend, dtype, rows):
    packed, scales, zeros, group_size = _case(48, 320, 64, zero_points=rows % 2 == 1, seed=rows)
    x = torch.randn(rows, 320).to(dtype)
    bias = torch.randn(48).to(dtype) if rows > 1 else None
    expected = int4_linear_reference(x, packed, scales, zeros, group_size, bias)
    for _ in range(2):  # the second call of dequant_cached uses the cached weight
        assert_bitwise_equal(int4_linear(x, packed, scales, zeros, group_size, bias, backend=backend), expected)


@needs_int4pack
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 3, 17, 64))
def test_int4pack_within_tolerance(group, dtype, rows):
    n, k = (48, 4160) if group == 64 and rows == 3 else (48, 256)  # awkward N (padded to 64) and K
    packed, scales, zeros, group_size = _case(n, k, group, zero_points=group != 128, seed=rows)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype) if rows != 1 else None
    actual = int4_linear(x, packed, scales, zeros, group_size, bias, backend="cpu_int4pack")
    expected = int4_linear_reference(x, packed, scales, zeros, group_size, bias)
    bound = error_bound(x, packed, scales, zeros, group_size, bias, TOLERANCES["cpu_int4pack", dtype])
    assert_within_bound(actual, expected, bound, f"cpu_int4pack {dtype} M={rows} group={group}")


@needs_int4pack
def test_int4pack_is_not_trivially_exact_for_fp32():
    """The bound above is needed: bf16 compute really differs from the fp32 reference."""
    packed, scales, zeros, group_size = _case(64, 256, 32, zero_points=True)
    x = torch.randn(4, 256)
    actual = int4_linear(x, packed, scales, zeros, group_size, backend="cpu_int4pack")
    assert not torch.equal(actual, int4_linear_reference(x, packed, scales, zeros, group_size))


@needs_int4pack
def test_int4pack_repeats_scales_for_large_groups():
    """Group 512 runs as kernel groups of 256 with each scale repeated: same result as groups of 256."""
    packed, scales, zeros, _ = _case(32, 1024, 512, zero_points=True)
    x = torch.randn(3, 1024).bfloat16()
    large = cpu.linear_int4pack(x, PackedInt4Weight(packed, scales, zeros, 512))
    split = PackedInt4Weight(packed, scales.repeat_interleave(2, 1), zeros.repeat_interleave(2, 1), 256)
    assert_bitwise_equal(large, cpu.linear_int4pack(x, split))
    form = PackedInt4Weight(packed, scales, zeros, 512).form("cpu_int4pack", cpu.build_int4pack)
    assert form.kernel_group_size == 256


@needs_int4pack
def test_int4pack_keeps_leading_dimensions_and_empty_batches():
    packed, scales, zeros, group_size = _case(32, 128, 32, zero_points=False)
    x = torch.randn(2, 3, 128)
    y = int4_linear(x, packed, scales, zeros, group_size, backend="cpu_int4pack")
    assert y.shape == (2, 3, 32)
    assert_bitwise_equal(y[1], int4_linear(x[1], packed, scales, zeros, group_size, backend="cpu_int4pack"))
    assert int4_linear(x[:0], packed, scales, zeros, group_size, backend="cpu_int4pack").shape == (0, 3, 32)


def test_int4pack_refuses_group_sizes_it_cannot_run():
    packed, scales, zeros, group_size = _case(32, 128, 16, zero_points=True)
    with pytest.raises(ValueError, match=r"cpu_int4pack.*divisible by 32"):
        int4_linear(torch.randn(1, 128), packed, scales, zeros, group_size, backend="cpu_int4pack")


@needs_int4pack
@pytest.mark.parametrize("group", (32, 256, "per-channel"))
def test_int4pack_is_bitwise_exact_when_the_arithmetic_is(group):
    """Dyadic scales, integer activations: every code, scale and zero must land in the right place."""
    k = 512
    group_size = k if group == "per-channel" else group
    x, packed, scales, zeros = make_exact_case(48, k, group_size, rows=5, dtype=torch.bfloat16)
    assert_bitwise_equal(int4_linear(x, packed, scales, zeros, group_size, backend="cpu_int4pack"),
                         int4_linear_reference(x, packed, scales, zeros, group_size))
    assert_bitwise_equal(int4_linear(x, packed, scales, None, group_size, backend="cpu_int4pack"),
                         int4_linear_reference(x, packed, scales, None, group_size))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 17))
def test_bf16_cached(dtype, rows):
    """Exactly the reference for bf16 activations; within the bf16 bound for the others."""
    packed, scales, zeros, group_size = _case(48, 320, 32, zero_points=True, seed=rows)
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)).to(dtype)
    bias = torch.randn(48).to(dtype)
    actual = int4_linear(x, packed, scales, zeros, group_size, bias, backend="cpu_bf16_cached")
    expected = int4_linear_reference(x, packed, scales, zeros, group_size, bias)
    if dtype == torch.bfloat16:
        assert_bitwise_equal(actual, expected)
    else:
        bound = error_bound(x, packed, scales, zeros, group_size, bias, TOLERANCES["cpu_bf16_cached", dtype])
        assert_within_bound(actual, expected, bound, f"cpu_bf16_cached {dtype} M={rows}")
