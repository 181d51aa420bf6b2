"""Worst-case accumulation on the CPU paths: extreme codes and activations, the largest K, float64 truth."""

from __future__ import annotations

import pytest
import torch
from qat.kernels import cpu
from qat.kernels.dispatch import int4_linear
from qat.kernels.reference import dequantize_int4, int4_linear_reference, pack_int4

from tests.kernels.helpers import TOLERANCES, assert_within_bound, error_bound

K = 16384  # the largest K tested: 128 groups of 128
N, GROUP = 32, 128
# Largest activation per dtype such that y = K * 15 * 2^-4 * x stays finite (fp16: 61440 < 65504).
EXTREME_X = {torch.float16: 4.0, torch.bfloat16: 2.0**100, torch.float32: 2.0**100}
BACKENDS = ["reference", "dequant", "dequant_cached"] + (["cpu_int4pack"] if cpu.int4pack_available() else [])


def _extreme_layer():
    packed = torch.full((N, K // 2), 0xFF, dtype=torch.uint8)  # every code 15
    zeros = torch.zeros(N, K // GROUP, dtype=torch.uint8)  # so every weight is +15 * scale, the largest
    scales = torch.full((N, K // GROUP), 2.0**-4, dtype=torch.float16)
    return packed, scales, zeros


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(EXTREME_X))
def test_same_sign_sums_and_exact_cancellation(backend, dtype):
    """All K products equal and positive: y = K * 15/16 * x exactly (every partial sum is exact in fp32);
    alternating signs cancel to exactly 0."""
    packed, scales, zeros = _extreme_layer()
    x = torch.full((2, K), EXTREME_X[dtype], dtype=torch.float64)
    x[1, 1::2] *= -1
    actual = int4_linear(x.to(dtype), packed, scales, zeros, GROUP, backend=backend).double()
    expected = torch.stack([torch.full((N,), K * 15 / 16 * EXTREME_X[dtype]), torch.zeros(N)]).double()
    assert torch.equal(actual, expected), f"{backend} {dtype}: {actual[:, 0].tolist()} != {expected[:, 0].tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_random_extremes_against_float64(backend, dtype):
    """Codes and zeros at 0 or 15 (weights +-15 scale or 0), activations +-2^100 or 0, random signs."""
    generator = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 2, (N, K), generator=generator).to(torch.uint8) * 15
    zeros = torch.randint(0, 2, (N, K // GROUP), generator=generator).to(torch.uint8) * 15
    scales = torch.full((N, K // GROUP), 2.0**-4, dtype=torch.float16)
    packed = pack_int4(codes)
    x = (torch.randint(-1, 2, (3, K), generator=generator).double() * 2.0**100).to(dtype)
    truth = x.double() @ dequantize_int4(packed, scales, zeros, GROUP).double().T  # exact weights, float64 sums
    actual = int4_linear(x, packed, scales, zeros, GROUP, backend=backend)
    assert torch.isfinite(actual).all()
    if backend == "cpu_int4pack":
        bound = error_bound(x, packed, scales, zeros, GROUP, None, TOLERANCES[backend, dtype])
        assert_within_bound(actual, truth.to(dtype), bound, f"{backend} {dtype}")
    else:  # every product is +-15/16 * 2^100 or 0 and the sums are exact: only y's final rounding is left
        assert torch.equal(actual, truth.to(dtype)), backend
        assert torch.equal(actual, int4_linear_reference(x, packed, scales, zeros, GROUP))
