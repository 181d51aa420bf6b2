"""The int8-activation CPU path (kernels/int8_act.py, kernels/csrc/int8_act_gemm.cpp) against its specification."""

from __future__ import annotations

import pytest
import torch
from qat.kernels import dispatch, int8_act
from qat.kernels.reference import int4_linear_reference, unpack_int4
from qat.kernels.weights import PackedInt4Weight

from tests.kernels.helpers import assert_bitwise_equal, assert_within_bound, int8_activation_bound, make_layer

if int8_act.int8_act_unsupported(torch.zeros(1, 128), PackedInt4Weight(*make_layer(16, 128, 128), 128)) is not None:
    pytest.skip("the int8-activation kernel cannot run here (no C++ compiler or no AVX2)",
                allow_module_level=True)

from qat.kernels.native import native_module

# (N, K, group): odd N (panels of 16 outputs, tiles of 3 panels, tails of 1-15 rows), K an odd multiple of 32 (96,
# 4128), groups of 32 (one block each) / 64 / 96 / 128 / 256, a single output row
SHAPES = ((47, 256, 32), (33, 384, 128), (17, 4128, 96), (64, 512, 256), (1, 96, 32), (100, 320, 64))
ROWS = (1, 3, 4, 5, 9, 70)  # register tiles of 4 rows plus tails


def _x(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator) * torch.rand(rows, k // 32, 1, generator=generator).repeat(
        1, 1, 32).reshape(rows, k).mul(4)  # blocks of different magnitudes
    x[0, :32] = 0.0  # an all-zero block (sx = 1, q = 0)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_compiled_quantizer_equals_the_specification_bit_for_bit(dtype):
    x = _x(9, 4128, dtype, seed=1)
    x[1, 40:72] = torch.arange(32, dtype=torch.float32).sub(15.5).mul(127 / 15.5 / 3.0).to(dtype)  # halfway cases
    x[2, 64:96] = torch.tensor([127.0, -0.5, 0.5, 1.5, -1.5, 2.5] + [0.0] * 26).to(dtype)  # ties at sx = 1
    x[3, 96:128] = 1e-44 if dtype == torch.float32 else 1e-39  # subnormal (fp32: max / 127 underflows -> sx = 1)
    for actual, expected in zip(native_module().quantize_activations(x, 32),
                                int8_act.quantize_activations_reference(x, 32), strict=True):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    q, sx, qsum = int8_act.quantize_activations_reference(x, 32)
    assert q[2, 64:70].tolist() == [127, 0, 0, 2, -2, 2]  # round half to even
    assert sx[0, 0] == 1.0 and not q[0, :32].any()
    if dtype == torch.float32:
        assert sx[3, 3] == 1.0 and not q[3, 96:128].any()
    else:  # bf16's subnormals are large enough for a scale: the block is quantized like any other
        assert 0 < sx[3, 3] < 1e-40 and (q[3, 96:128] == 127).all()
    assert q.abs().max() <= 127 and torch.equal(qsum, q.reshape(9, -1, 32).sum(-1, dtype=torch.int32))


def test_the_kernel_is_offered_exactly_where_the_cpu_can_run_one_of_its_builds():
    """AVX-512 F/BW/VNNI compiled in, or AVX2 + FMA + F16C found at run time (/proc/cpuinfo spells them so)."""
    from qat.kernels import native

    flags = native.cpu_flags()
    expected = set(native.AVX512_FLAGS) <= flags or {"avx2", "fma", "f16c"} <= flags
    assert native_module().int8_act_available() == expected


def test_codes_form_is_sixteen_rows_by_eight_k_per_64_bytes():
    packed, _, _ = make_layer(21, 64, 32, seed=3)
    codes = unpack_int4(packed)
    form = int8_act.vnni_codes(packed)
    assert form.shape == (2, 8, 64)
    for panel in range(2):
        for chunk in range(8):
            for j in range(16):
                for i in range(4):
                    row = 16 * panel + j
                    low, high = (int(codes[row, 8 * chunk + i]), int(codes[row, 8 * chunk + 4 + i])) \
                        if row < 21 else (0, 0)
                    assert int(form[panel, chunk, 4 * j + i]) == low | high << 4


@pytest.mark.parametrize("zero_points", (True, False), ids=("asym", "sym"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_kernel_equals_the_integer_formula_up_to_fp32_summation(shape, zero_points):
    """sum_b fl(s sx) * (sum c q - z Q) in float64 from the same q: only the kernel's fp32 roundings differ."""
    n, k, group = shape
    packed, scales, zeros = make_layer(n, k, group, torch.float16, zero_points, seed=n + k)
    weight = PackedInt4Weight(packed, scales, zeros, group)
    form = int8_act.vnni_form(weight)
    codes = unpack_int4(packed).double()
    zero = (zeros.double() if zero_points else torch.full(scales.shape, 8.0, dtype=torch.float64))
    for rows in ROWS:
        q, sx, qsum = int8_act.quantize_activations_reference(_x(rows, k, torch.float32, seed=rows), 32)
        actual = native_module().int8_act_gemm(q, sx, qsum, form.codes, form.scales, form.zeros, n, 32)
        blocks = k // 32
        dots = torch.einsum("mbk,nbk->mnb", q.double().reshape(rows, blocks, 32), codes.reshape(n, blocks, 32))
        group_of_block = torch.arange(blocks) // (group // 32)
        dots = dots - zero[:, group_of_block].unsqueeze(0) * qsum.double().unsqueeze(1)  # exact integers
        both = (scales.float()[:, group_of_block].unsqueeze(0) * sx.unsqueeze(1)).double()  # fl(s * sx), as the kernel
        terms = both * dots
        expected = terms.sum(-1)
        bound = (blocks + 2) * 2.0**-24 * terms.abs().sum(-1)  # fp32 fused multiply-add chain over the blocks
        assert_within_bound(actual.double(), expected, bound, f"{shape} M={rows}")


@pytest.mark.parametrize("x_dtype", (torch.bfloat16, torch.float32, torch.float16))
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_linear_within_the_int8_rounding_bound_of_the_reference(shape, scale_dtype, x_dtype):
    n, k, group = shape
    zero_points = scale_dtype != torch.bfloat16
    packed, scales, zeros = make_layer(n, k, group, scale_dtype, zero_points, seed=k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(x_dtype)
    weight = PackedInt4Weight(packed, scales, zeros, group, bias)
    for rows in (1, 6, 70):
        x = _x(rows, k, x_dtype, seed=rows + n)
        actual = dispatch.int4_linear_prepared(x, weight, backend="cpu_int8_act")
        expected = int4_linear_reference(x, packed, scales, zeros, group, bias)
        _, sx, _ = int8_act.quantize_activations_reference(x.float(), 32)
        bound = int8_activation_bound(x, packed, scales, zeros, group, bias, sx, 32)
        assert_within_bound(actual, expected, bound, f"cpu_int8_act {x_dtype} M={rows}")
        assert (actual.double() - expected.double()).abs().max() > 0  # x really went through int8


def test_exact_when_x_is_already_on_the_int8_grid():
    """x = sx * q exactly (integers times a power of two): no rounding of x, so the result is the reference's."""
    packed, scales, zeros = make_layer(40, 256, 64, torch.float32, True, seed=5)
    scales = torch.full_like(scales, 0.25)
    generator = torch.Generator().manual_seed(6)
    q = torch.randint(-127, 128, (5, 256), generator=generator)
    q[:, ::32] = 127  # each block's largest |q| is 127, so sx = 127 * 2**-3 / 127 = 2**-3 exactly
    x = q.float() * 2.0**-3
    actual = dispatch.int4_linear(x, packed, scales, zeros, 64, backend="cpu_int8_act")
    expected = int4_linear_reference(x.double(), packed, scales.double(), zeros, 64)  # exact in float64 and fp32
    assert_bitwise_equal(actual, expected.float(), "on-grid x")


def test_non_finite_activations_give_nan_rows_not_finite_garbage():
    packed, scales, zeros = make_layer(20, 128, 32, seed=7)
    x = _x(3, 128, torch.bfloat16, seed=8)
    x[1, 70] = float("inf")
    x[2, 5] = float("nan")
    y = dispatch.int4_linear(x, packed, scales, zeros, 32, backend="cpu_int8_act")
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[0]).all()


def test_group_sizes_that_are_not_multiples_of_32_are_refused_with_the_reason():
    weight = PackedInt4Weight(*make_layer(8, 96, 48), 48)
    reason = int8_act.int8_act_unsupported(torch.zeros(2, 96), weight)
    assert reason is not None and "multiple of 32" in reason and "48" in reason
    with pytest.raises(ValueError, match=r"cpu_int8_act.*multiple of 32"):
        dispatch.int4_linear_prepared(torch.zeros(2, 96), weight, backend="cpu_int8_act")


def test_policy_decides_which_activations_automatic_dispatch_may_round_to_int8(monkeypatch):
    weight = PackedInt4Weight(*make_layer(64, 256, 64), 64)
    monkeypatch.delenv(int8_act.ENV_VAR, raising=False)
    assert "cpu_int8_act" in dispatch.cpu_candidates(torch.zeros(64, 256, dtype=torch.bfloat16), weight)
    assert "cpu_int8_act" not in dispatch.cpu_candidates(torch.zeros(64, 256), weight)
    monkeypatch.setenv(int8_act.ENV_VAR, "all")
    assert "cpu_int8_act" in dispatch.cpu_candidates(torch.zeros(64, 256), weight)
    monkeypatch.setenv(int8_act.ENV_VAR, "off")
    assert "cpu_int8_act" not in dispatch.cpu_candidates(torch.zeros(64, 256, dtype=torch.bfloat16), weight)
    monkeypatch.setenv(int8_act.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"QAT_INT8_ACTIVATIONS='sometimes'.*bf16, all, off"):
        dispatch.cpu_candidates(torch.zeros(64, 256, dtype=torch.bfloat16), weight)


def test_the_bound_call_equals_the_dispatched_one_for_plain_and_other_rows():
    packed, scales, zeros = make_layer(50, 192, 64, seed=9)
    weight = PackedInt4Weight(packed, scales, zeros, 64, torch.randn(50))
    for x in (torch.randn(1, 192), torch.randn(2, 3, 192), torch.randn(1, 192).bfloat16()):  # kernel direct, reshaped
        run = dispatch.bind(x, weight, backend="cpu_int8_act")
        assert torch.equal(run(x), dispatch.int4_linear_prepared(x, weight, backend="cpu_int8_act"))
