"""The blocked CPU path (dequantize tiles of rows + dense GEMM) against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from qat.kernels import blocked, native
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

X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (N, K, group): odd N, K not a multiple of 256 (320, 384, 4160), several tiles with a ragged last one
SHAPES = ((47, 320, 32), (33, 384, 128), (64, 4160, 64), (40, 192, 64))


@pytest.fixture(params=("compiled", "torch ops"))
def dequantizer(request, monkeypatch):
    """Each test runs with the compiled tile dequantizer (kernels/csrc; skipped where it cannot be built) and with
    the torch-op fallback; both must give the same bits."""
    if request.param == "compiled":
        if native.native_module() is None:
            pytest.skip("the compiled dequantizer could not be built here")
    else:
        monkeypatch.setattr(blocked, "native_module", lambda: None)
    return request.param


def _cases():
    """Every group size, scale dtype and zero-point form, spread over the shapes (not the full product)."""
    combos = itertools.product(SHAPES, SCALE_DTYPES, (True, False))
    return [pytest.param(shape, scale_dtype, zero_points, id=f"{shape[0]}x{shape[1]}g{shape[2]}-"
                         f"{str(scale_dtype)[6:]}-{'asym' if zero_points else 'sym'}")
            for shape, scale_dtype, zero_points in combos]


@pytest.mark.parametrize(("shape", "scale_dtype", "zero_points"), _cases())
def test_tiles_are_the_reference_weights_permuted(shape, scale_dtype, zero_points, dequantizer, monkeypatch):
    monkeypatch.setattr(blocked, "DEQUANT_ROWS", 6)  # tiles of 16 rows dequantized 6, 6, 4 rows at a time
    n, k, group = shape
    packed, scales, zeros = make_layer(n, k, group, scale_dtype, zero_points, seed=n)
    weight = PackedInt4Weight(packed, scales, zeros, group)
    reference = dequantize_int4(packed, scales, zeros, group)  # (N, K) fp32
    permuted = blocked.permute_k(reference, group)
    for dtype in (torch.float32, torch.bfloat16):
        buffers = blocked.TileBuffers(16, k, dtype, native=dequantizer == "compiled")
        for start in range(0, n, 16):
            stop = min(start + 16, n)
            assert_bitwise_equal(blocked.dequantize_tile(weight, start, stop, buffers),
                                 permuted[start:stop].to(dtype), f"rows {start}:{stop} {dtype}")


def test_permute_k_orders_each_group_even_then_odd():
    x = torch.arange(8.0).view(1, 8)
    assert blocked.permute_k(x, 4).tolist() == [[0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]]


@pytest.mark.parametrize("backend", ("cpu_blocked", "cpu_blocked_bf16"))
@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize(("shape", "scale_dtype", "zero_points"), _cases())
def test_blocked_within_tolerance(backend, x_dtype, shape, scale_dtype, zero_points, dequantizer, monkeypatch):
    monkeypatch.setattr(blocked, "DEQUANT_ROWS", 7)
    n, k, group = shape
    packed, scales, zeros = make_layer(n, k, group, scale_dtype, zero_points, seed=k)
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(3, k, generator=generator).to(x_dtype)  # M = 3
    bias = torch.randn(n, generator=generator).to(x_dtype) if zero_points else None
    weight = PackedInt4Weight(packed, scales, zeros, group, bias)
    compute = torch.bfloat16 if backend == "cpu_blocked_bf16" else None
    actual = blocked.linear_blocked(x, weight, bias, compute_dtype=compute, tile_rows=16)  # ragged tiles
    expected = int4_linear_reference(x, packed, scales, zeros, group, bias)
    bound = error_bound(x, packed, scales, zeros, group, bias, TOLERANCES[backend, x_dtype])
    assert_within_bound(actual, expected, bound, f"{backend} x {x_dtype}")
    assert_bitwise_equal(int4_linear(x, packed, scales, zeros, group, bias, backend=backend),
                         blocked.linear_blocked(x, weight, bias, compute_dtype=compute))


@pytest.mark.parametrize("rows", (1, 5, 130))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
def test_blocked_is_bitwise_exact_when_the_arithmetic_is(rows, x_dtype, dequantizer):
    """Exact products and sums: a misplaced code, zero or scale (or a wrong permutation) cannot hide."""
    x, packed, scales, zeros = make_exact_case(40, 256, 64, rows=rows, dtype=x_dtype)
    weight = PackedInt4Weight(packed, scales, zeros, 64)
    for compute in (None, x_dtype):  # a bf16 GEMM for fp32 x would round y to bf16: tolerance tests cover it
        assert_bitwise_equal(blocked.linear_blocked(x, weight, compute_dtype=compute, tile_rows=16),
                             int4_linear_reference(x, packed, scales, zeros, 64))


def test_blocked_keeps_leading_dimensions_and_empty_batches():
    packed, scales, zeros = make_layer(24, 128, 32)
    weight = PackedInt4Weight(packed, scales, zeros, 32)
    x = torch.randn(2, 3, 128)
    y = blocked.linear_blocked(x, weight)
    assert y.shape == (2, 3, 24) and y.dtype == x.dtype
    bound = error_bound(x, packed, scales, zeros, 32, None, TOLERANCES["cpu_blocked", torch.float32])
    assert_within_bound(y, int4_linear_reference(x, packed, scales, zeros, 32), bound, "(2, 3, K) input")
    assert blocked.linear_blocked(x[:0], weight).shape == (0, 3, 24)


@pytest.mark.parametrize("threads", (None, 1, 2))
def test_dequant_threads_setting_keeps_results_and_restores_the_pool(threads, monkeypatch):
    monkeypatch.setattr(blocked, "DEQUANT_THREADS", threads)
    packed, scales, zeros = make_layer(40, 256, 64)
    weight = PackedInt4Weight(packed, scales, zeros, 64)
    before = torch.get_num_threads()
    buffers = blocked.TileBuffers(40, 256, torch.float32)
    assert_bitwise_equal(blocked.dequantize_tile(weight, 0, 40, buffers),
                         blocked.permute_k(dequantize_int4(packed, scales, zeros, 64), 64))
    assert torch.get_num_threads() == before


def test_blocked_refuses_odd_group_sizes():
    packed, scales, zeros = make_layer(8, 6, 3)
    with pytest.raises(ValueError, match=r"cpu_blocked.*even group size, got 3"):
        int4_linear(torch.randn(1, 6), packed, scales, zeros, 3, backend="cpu_blocked")


def test_the_compiled_dequantizer_builds_where_a_compiler_is(monkeypatch):
    """CI has g++: a build that breaks must fail here, not fall back to the torch path unnoticed."""
    import shutil

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    module = native.native_module()
    assert module is not None
    assert module.vectorized() == (set(native.AVX512_FLAGS) <= native.cpu_flags())


def test_the_compiled_dequantizer_checks_its_inputs():
    module = native.native_module()
    if module is None:
        pytest.skip("the compiled dequantizer could not be built here")
    packed, scales, zeros = make_layer(8, 64, 32)
    out = torch.empty(8, 64)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        module.dequantize_tile(packed, scales, zeros, 32, 0, 8, out)  # fp16 scales
    with pytest.raises(RuntimeError, match="rows out of range"):
        module.dequantize_tile(packed, scales.float(), zeros, 32, 0, 9, out)
    with pytest.raises(RuntimeError, match="group_size does not match K"):
        module.dequantize_tile(packed, scales.float(), zeros, 16, 0, 8, out)


def test_native_module_is_none_when_disabled(monkeypatch):
    native.native_module.cache_clear()
    monkeypatch.setenv(native.ENV_DISABLE, "0")
    try:
        assert native.native_module() is None
    finally:
        native.native_module.cache_clear()


def test_compile_flags_add_avx512_only_when_the_cpu_has_all_of_it():
    assert native.compile_flags(set()) == ["-O3", "-fopenmp"]
    assert native.compile_flags({"avx512f", "avx512bw"}) == ["-O3", "-fopenmp"]
    assert native.compile_flags({"avx512f", "avx512bw", "avx512_bf16"}) == ["-O3", "-fopenmp"]  # no VNNI
    options = native.compile_flags({"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "sse2"})
    assert "-mavx512bf16" in options and "-mavx512vnni" in options
