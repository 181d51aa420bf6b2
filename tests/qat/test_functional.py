"""qat.functional against hand-written formulas, bit for bit.

The references below are written in numpy float32 (IEEE division and round-half-to-even,
like torch), element by element through explicit index maps, so they share no code with
qat's broadcasting helpers. Every comparison is exact (atol=0).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.functional import (
    SCALE_EPS,
    NonFiniteError,
    check_finite,
    choose_qparams,
    dequantize,
    effective_qparams,
    expand_qparam,
    fake_quantize,
    grouped_view,
    qparam_shape,
    quant_range,
    quantize,
)

BITS = range(2, 9)
# (symmetric, signed): the four code layouts
MODES = [(True, True), (True, False), (False, False), (False, True)]
F32 = np.float32


def ref_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_choose_qparams(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool, signed: bool):
    """Scale and zero point per range, one range at a time."""
    qmin, qmax = ref_range(bits, signed)
    scales, zeros = np.empty_like(lo, dtype=F32), np.empty_like(lo, dtype=F32)
    for i in np.ndindex(lo.shape):
        low, high = F32(lo[i]), F32(hi[i])
        if symmetric:
            top = max(abs(low), abs(high)) if signed else max(high, F32(0))
            scale, zero = max(F32(top / F32(qmax)), F32(SCALE_EPS)), F32(0)
        else:
            low, high = min(low, F32(0)), max(high, F32(0))
            scale = max(F32((high - low) / F32(qmax - qmin)), F32(SCALE_EPS))
            zero = F32(min(max(qmin - np.round(F32(low / scale)), qmin), qmax))
        scales[i], zeros[i] = scale, zero
    return scales, zeros


def ref_fake_quantize(x: np.ndarray, scale_full: np.ndarray, zero_full: np.ndarray, qmin: int, qmax: int):
    """(codes, dequantized) with qparams already gathered per element (float32 throughout)."""
    codes = np.clip(np.round((x / scale_full).astype(F32)) + zero_full, qmin, qmax).astype(F32)
    return codes, ((codes - zero_full) * scale_full).astype(F32)


def channel_index(shape: tuple, axis: int) -> np.ndarray:
    """For every element, the index of its channel along `axis`."""
    return np.indices(shape)[axis]


def group_index(shape: tuple, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For every element, (row, group) with groups along the flattened trailing dims."""
    rows = np.indices(shape)[0]
    flat_col = np.arange(math.prod(shape[1:])).reshape(shape[1:])
    return rows, np.broadcast_to(flat_col // group_size, shape)


def random_x(shape: tuple, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    x.view(-1)[::7] += 1.5  # skew some values so ranges are not symmetric
    return x


def assert_exact(actual: torch.Tensor, expected: np.ndarray) -> None:
    torch.testing.assert_close(actual, torch.from_numpy(np.ascontiguousarray(expected)), atol=0, rtol=0)


@pytest.mark.parametrize("bits", BITS)
def test_quant_range_matches_twos_complement_and_unsigned(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)


@pytest.mark.parametrize(("bits", "mode"), list(itertools.product(BITS, MODES)))
def test_choose_qparams_matches_formula(bits, mode):
    symmetric, signed = mode
    gen = torch.Generator().manual_seed(bits)
    lo = torch.randn(40, generator=gen) * 3
    hi = lo + torch.rand(40, generator=gen) * 4
    lo[:5], hi[:5] = torch.rand(5, generator=gen) + 0.5, torch.rand(5, generator=gen) + 2  # positive-only ranges
    lo[5:10], hi[5:10] = -torch.rand(5, generator=gen) - 2, -torch.rand(5, generator=gen)  # negative-only ranges
    scale, zero = choose_qparams(lo, hi, bits, symmetric, signed)
    ref_scale, ref_zero = ref_choose_qparams(lo.numpy(), hi.numpy(), bits, symmetric, signed)
    assert_exact(scale, ref_scale)
    assert_exact(zero, ref_zero)


def test_choose_qparams_signed_defaults_to_symmetric():
    lo, hi = torch.tensor([-1.0]), torch.tensor([3.0])
    assert choose_qparams(lo, hi, 4, True)[0].item() == pytest.approx(3 / 7)
    assert choose_qparams(lo, hi, 4, False)[1].item() == 4  # unsigned: 0 - round(-1 / (4 / 15))


@pytest.mark.parametrize(("bits", "mode"), list(itertools.product(BITS, MODES)))
def test_per_tensor_quantize_dequantize_fake_quantize_exact(bits, mode):
    symmetric, signed = mode
    qmin, qmax = quant_range(bits, signed)
    x = random_x((3, 50), seed=bits)
    scale, zero = choose_qparams(x.min() * 0.7, x.max() * 0.7, bits, symmetric, signed)  # some values clip
    codes = quantize(x, scale, zero, qmin, qmax)
    ref_codes, ref_out = ref_fake_quantize(x.numpy(), scale.numpy(), zero.numpy(), qmin, qmax)
    assert_exact(codes, ref_codes)
    assert_exact(dequantize(codes, scale, zero), ref_out)
    assert_exact(fake_quantize(x, scale, zero, qmin, qmax), ref_out)
    assert codes.min() >= qmin and codes.max() <= qmax


def test_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 3.51])
    codes = quantize(x, torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    assert codes.tolist() == [0, 2, 2, 0, -2, -2, 3, 4]


CHANNEL_CASES = [
    ((8, 24), 0),
    ((8, 24), 1),
    ((4, 6, 5), 0),
    ((4, 6, 5), 1),
    ((4, 6, 5), 2),
    ((6, 3, 3, 3), 0),
    ((6, 3, 3, 3), 1),
    ((4, 6, 5), -1),
]


@pytest.mark.parametrize(("shape", "axis"), CHANNEL_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_fake_quantize_exact(shape, axis, mode, bits):
    symmetric, signed = mode
    qmin, qmax = quant_range(bits, signed)
    x = random_x(shape, seed=len(shape) + axis)
    assert qparam_shape(shape, "channel", axis=axis) == (shape[axis],)
    idx = channel_index(shape, axis)
    x_np = x.numpy()
    lo = np.array([x_np[idx == c].min() for c in range(shape[axis])], dtype=F32)
    hi = np.array([x_np[idx == c].max() for c in range(shape[axis])], dtype=F32)
    ref_scale, ref_zero = ref_choose_qparams(lo, hi, bits, symmetric, signed)
    scale, zero = choose_qparams(torch.from_numpy(lo), torch.from_numpy(hi), bits, symmetric, signed)
    assert_exact(scale, ref_scale)
    view = grouped_view(x, "channel", axis=axis)
    out = fake_quantize(
        view,
        expand_qparam(scale, "channel", view.dim(), axis),
        expand_qparam(zero, "channel", view.dim(), axis),
        qmin,
        qmax,
    )
    _, ref_out = ref_fake_quantize(x_np, ref_scale[idx], ref_zero[idx], qmin, qmax)
    assert_exact(out, ref_out)


GROUP_CASES = [((6, 512), gs) for gs in (16, 32, 64, 128, 256)] + [((4, 8, 4, 4), 16), ((4, 8, 4, 4), 128)]


@pytest.mark.parametrize(("shape", "group_size"), GROUP_CASES)
@pytest.mark.parametrize(("bits", "mode"), [(4, MODES[0]), (4, MODES[2]), (2, MODES[1]), (8, MODES[3]), (3, MODES[2])])
def test_per_group_fake_quantize_exact(shape, group_size, bits, mode):
    symmetric, signed = mode
    qmin, qmax = quant_range(bits, signed)
    x = random_x(shape, seed=group_size)
    pshape = qparam_shape(shape, "group", group_size)
    assert pshape == (shape[0], math.prod(shape[1:]) // group_size)
    rows, groups = group_index(shape, group_size)
    x_np = x.numpy()
    lo = np.array([[x_np[(rows == r) & (groups == g)].min() for g in range(pshape[1])] for r in range(pshape[0])])
    hi = np.array([[x_np[(rows == r) & (groups == g)].max() for g in range(pshape[1])] for r in range(pshape[0])])
    ref_scale, ref_zero = ref_choose_qparams(lo.astype(F32), hi.astype(F32), bits, symmetric, signed)
    scale, zero = choose_qparams(torch.from_numpy(lo), torch.from_numpy(hi), bits, symmetric, signed)
    view = grouped_view(x, "group", group_size)
    out = fake_quantize(
        view, expand_qparam(scale, "group", view.dim()), expand_qparam(zero, "group", view.dim()), qmin, qmax
    ).reshape(shape)
    _, ref_out = ref_fake_quantize(x_np, ref_scale[rows, groups], ref_zero[rows, groups], qmin, qmax)
    assert_exact(out, ref_out)


def test_qparam_shape_refuses_group_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size=128 does not divide input dimension 576"):
        qparam_shape((8, 576), "group", 128)
    assert qparam_shape((8, 576), "tensor") == ()


DEGENERATE_RANGES = {
    "all zero": (0.0, 0.0),
    "constant positive": (3.0, 3.0),
    "constant negative": (-2.5, -2.5),
    "denormal": (-1e-40, 1e-40),
    "smallest denormal": (0.0, 1e-45),
}


@pytest.mark.parametrize("case", DEGENERATE_RANGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_degenerate_ranges_give_finite_positive_scales(case, mode, scale_dtype):
    symmetric, signed = mode
    qmin, qmax = quant_range(4, signed)
    value_lo, value_hi = DEGENERATE_RANGES[case]
    scale, zero = choose_qparams(torch.tensor([value_lo]), torch.tensor([value_hi]), 4, symmetric, signed)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    s, z = effective_qparams(scale, zero, qmin, qmax, scale_dtype)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert qmin <= z.item() <= qmax and z.item() == round(z.item())
    x = torch.tensor([value_lo, value_hi])
    out = fake_quantize(x, s, z, qmin, qmax)
    assert torch.isfinite(out).all()
    representable = (qmin - z) * s <= x.min() and x.max() <= (qmax - z) * s
    if representable.item():  # unsigned symmetric cannot hold negatives; otherwise within half a step
        assert ((out - x).abs() <= s / 2).all()
    if case == "all zero":
        assert (out == 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_ranges_raise(bad):
    with pytest.raises(NonFiniteError, match="range minimum has 1 non-finite"):
        choose_qparams(torch.tensor([bad, 0.0]), torch.tensor([1.0, 1.0]), 4, True)
    with pytest.raises(NonFiniteError, match="range maximum"):
        choose_qparams(torch.tensor([0.0]), torch.tensor([bad]), 4, False)
    with pytest.raises(NonFiniteError, match="my tensor has 1 non-finite"):
        check_finite(torch.tensor([1.0, bad]), "my tensor")


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_effective_qparams_rounds_clamps_and_keeps_float32(scale_dtype):
    info = torch.finfo(scale_dtype)
    scale = torch.tensor([0.1234567, 3.3e-3, 1e-12, 1e30, 0.0])
    zero = torch.tensor([2.4, 2.6, -20.0, 20.0, 7.5])
    s, z = effective_qparams(scale, zero, 0, 15, scale_dtype)
    assert s.dtype == torch.float32 and z.dtype == torch.float32
    lowest = max(SCALE_EPS, info.tiny)
    expected = torch.tensor([0.1234567, 3.3e-3, lowest, min(1e30, info.max), lowest]).to(scale_dtype).float()
    assert_exact(s, expected.numpy())
    assert z.tolist() == [2.0, 3.0, 0.0, 15.0, 8.0]  # round half to even, then clamp into [qmin, qmax]


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(2, 8),
    mode=st.sampled_from(MODES),
    scale=st.floats(1e-4, 1e3),
    zero_fraction=st.floats(0.0, 1.0),
    position=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16),
)
def test_property_error_at_most_half_a_step_inside_range(bits, mode, scale, zero_fraction, position):
    """|x - fake_quantize(x)| <= scale / 2 for x in [(qmin - z) * s, (qmax - z) * s].

    Slack of a few float32 ulps: x / s and (code - z) * s are each rounded once.
    """
    symmetric, signed = mode
    qmin, qmax = quant_range(bits, signed)
    z = 0.0 if symmetric else float(round(qmin + zero_fraction * (qmax - qmin)))
    s = torch.tensor(scale, dtype=torch.float32)
    low, high = (qmin - z) * s, (qmax - z) * s
    x = low + torch.tensor(position, dtype=torch.float32) * (high - low)
    x = x.clamp(low, high)
    out = fake_quantize(x, s, torch.tensor(z), qmin, qmax)
    slack = 4 * torch.finfo(torch.float32).eps * torch.maximum(x.abs(), s)
    assert ((x - out).abs() <= s / 2 + slack).all()


def test_asymmetric_range_near_float32_max_gives_a_finite_scale():
    big = torch.finfo(torch.float32).max
    scale, zero = choose_qparams(torch.tensor([-big]), torch.tensor([big]), bits=4, symmetric=False)
    assert torch.isfinite(scale).all() and scale.item() > 0 and 0 <= zero.item() <= 15


def test_int8_weight_multiplier_keeps_codes_within_64():
    from qat.functional import int8_weight_multiplier

    assert [int8_weight_multiplier(bits, True) for bits in (2, 3, 4, 5, 6, 7, 8)] == [32, 16, 8, 4, 2, 1, 1]
    assert [int8_weight_multiplier(bits, False) for bits in (2, 4, 6, 7, 8)] == [16, 4, 1, 1, 1]
    for bits in range(2, 7):  # every code minus zero, times k, within +-64 (x86 u8 x s8 pair sums do not saturate)
        assert 2 ** (bits - 1) * int8_weight_multiplier(bits, True) <= 64
        assert (2**bits - 1) * int8_weight_multiplier(bits, False) <= 64
