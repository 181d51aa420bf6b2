"""Gradients of round-STE, LSQ and LSQ+ against hand-derived element-by-element references.

Derivation (x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s, round passed straight
through, v = x / s, r = round(v), c = r + z):
    inside  (qmin <= c <= qmax): x_hat = r * s          -> dx = 1, ds = r - v,      dz = 0
    below   (c < qmin):          x_hat = (qmin - z) * s -> dx = 0, ds = qmin - z,   dz = -s
    above   (c > qmax):          x_hat = (qmax - z) * s -> dx = 0, ds = qmax - z,   dz = -s
Scale / zero-point gradients are summed over the elements sharing the parameter, then
multiplied by the grad factor. Sums are compared with rtol 1e-5: the reference adds in
float64 in index order, torch in float32 in its own order; elementwise results are exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qat.functional import effective_qparams, fake_quantize, quant_range
from qat.ste import lsq_fake_quantize, lsq_grad_factor, round_ste

F32 = np.float32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_grads(x, scale, zero, grad, qmin, qmax, factor):
    """Loop over elements; scale / zero have x's ndim and broadcast (size-1 dims)."""
    x, grad = x.numpy(), grad.numpy()
    as_x_dims = (1,) * x.ndim if scale.dim() == 0 else scale.shape
    s_all, z_all = scale.numpy().reshape(as_x_dims), np.clip(np.round(zero.numpy()), qmin, qmax).reshape(as_x_dims)
    dx = np.zeros_like(x)
    ds, dz = np.zeros(s_all.shape), np.zeros(z_all.shape)
    for idx in np.ndindex(x.shape):
        pidx = tuple(i if n > 1 else 0 for i, n in zip(idx, s_all.shape, strict=True))
        s, z, g = F32(s_all[pidx]), F32(z_all[pidx]), F32(grad[idx])
        v = F32(x[idx] / s)
        r = F32(np.round(v))
        if r + z < qmin:
            ds[pidx] += g * (qmin - z)
            dz[pidx] += g * -s
        elif r + z > qmax:
            ds[pidx] += g * (qmax - z)
            dz[pidx] += g * -s
        else:
            dx[idx] = g
            ds[pidx] += g * F32(r - v)
    return torch.from_numpy(dx), _scaled(ds, factor), _scaled(dz, factor)


def _scaled(total: np.ndarray, factor: float) -> torch.Tensor:
    return torch.from_numpy(np.asarray(total * factor)).float()


def run_lsq(x, scale, zero, qmin, qmax, factor, grad, learn_zero=True, scale_dtype=torch.float32):
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zero = zero.clone().requires_grad_(learn_zero)
    out = lsq_fake_quantize(x, scale, zero, qmin, qmax, factor, scale_dtype)
    out.backward(grad)
    return out, x.grad, scale.grad, zero.grad


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([-1.5, -0.4, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 2.0, 3.0]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_lsq_hand_computed_example():
    # 4-bit signed, s = 0.5: v = [-10, -8.4, 0.6, 6.8, 7.6, 20]
    x = torch.tensor([-5.0, -4.2, 0.3, 3.4, 3.8, 10.0])
    out, gx, gs, gz = run_lsq(x, torch.tensor(0.5), torch.tensor(0.0), -8, 7, 1.0, torch.ones(6), learn_zero=False)
    assert out.tolist() == [-4.0, -4.0, 0.5, 3.5, 3.5, 3.5]
    assert gx.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # STE: through inside, zero where clipped
    # ds: below -8; inside r - v = 0.4, 0.4, 0.2; above 7, 7
    assert gs.item() == pytest.approx(-8 + 0.4 + 0.4 + 0.2 + 7 + 7, abs=1e-5)
    assert gz is None  # zero point not learned: no gradient computed


def test_lsq_plus_hand_computed_example():
    # 4-bit unsigned [0, 15], s = 0.5, z = 3: representable [-1.5, 6.0]
    x = torch.tensor([-2.0, -1.4, 1.2, 5.9, 6.4])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out, gx, gs, gz = run_lsq(x, torch.tensor(0.5), torch.tensor(3.0), 0, 15, 0.25, grad)
    assert out.tolist() == [-1.5, -1.5, 1.0, 6.0, 6.0]
    assert gx.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    # ds: below 1 * (0 - 3); inside 2 * (-3 + 2.8), 3 * (2 - 2.4), 4 * (12 - 11.8); above 5 * (15 - 3)
    expected_ds = (-3 - 2 * 0.2 - 3 * 0.4 + 4 * 0.2 + 60) * 0.25
    assert gs.item() == pytest.approx(expected_ds, abs=1e-5)
    assert gz.item() == pytest.approx((1 + 5) * -0.5 * 0.25)  # -s per clipped element, weighted by grad


CASES = {
    "tensor": ((5, 40), ()),
    "channel_rows": ((6, 20), (6, 1)),
    "channel_cols": ((6, 20), (1, 20)),
    "group": ((4, 4, 16), (4, 4, 1)),
    "conv_channel": ((3, 4, 3, 3), (1, 4, 1, 1)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (4, True), (4, False), (8, False), (3, False)])
def test_lsq_gradients_match_reference(case, bits, symmetric):
    x_shape, p_shape = CASES[case]
    gen = torch.Generator().manual_seed(bits)
    qmin, qmax = quant_range(bits, symmetric)
    x = torch.randn(x_shape, generator=gen) * 1.5
    scale = torch.rand(p_shape, generator=gen) * 0.2 + 0.6 / qmax  # ~1/3 of the elements clip
    zero = torch.zeros(p_shape) if symmetric else torch.randint(0, qmax + 1, p_shape, generator=gen).float() + 0.3
    grad = torch.randn(x_shape, generator=gen)
    per_scale = x.numel() // max(1, scale.numel())
    factor = lsq_grad_factor(per_scale, qmax)
    _, gx, gs, gz = run_lsq(x, scale, zero, qmin, qmax, factor, grad, learn_zero=not symmetric)
    ref_dx, ref_ds, ref_dz = reference_grads(x, scale, zero, grad, qmin, qmax, factor)
    torch.testing.assert_close(gx, ref_dx, atol=0, rtol=0)
    torch.testing.assert_close(gs, ref_ds.reshape(gs.shape), rtol=1e-5, atol=1e-6)
    if not symmetric:
        torch.testing.assert_close(gz, ref_dz.reshape(gz.shape), rtol=1e-5, atol=1e-6)
    inside = gx != 0
    assert 0 < inside.float().mean() < 1, "the case must exercise both clipped and inside elements"


def test_grad_factor_formula():
    assert lsq_grad_factor(128, 7) == pytest.approx(1 / math.sqrt(128 * 7))
    assert lsq_grad_factor(1, 255) == pytest.approx(1 / math.sqrt(255))
    assert lsq_grad_factor(10, 0) == pytest.approx(1 / math.sqrt(10))  # qmax 0 never divides by zero


def test_grad_factor_scales_parameter_gradients_linearly():
    x, grad = torch.randn(64), torch.randn(64)
    _, gx1, gs1, gz1 = run_lsq(x, torch.tensor(0.1), torch.tensor(7.0), 0, 15, 1.0, grad)
    _, gx2, gs2, gz2 = run_lsq(x, torch.tensor(0.1), torch.tensor(7.0), 0, 15, 0.125, grad)
    assert torch.equal(gx1, gx2)  # the factor never touches the input gradient
    torch.testing.assert_close(gs2, gs1 * 0.125, atol=0, rtol=0)  # a power of two: exact
    torch.testing.assert_close(gz2, gz1 * 0.125, atol=0, rtol=0)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_forward_applies_scale_rounding_and_gradient_passes_it_straight(scale_dtype):
    x, grad = torch.randn(3, 50) * 2, torch.randn(3, 50)
    raw = torch.tensor([[0.1234567], [0.33337], [0.0911]])
    zero = torch.tensor([[7.0], [8.0], [6.0]])
    out, gx, gs, gz = run_lsq(x, raw, zero, 0, 15, 0.5, grad, scale_dtype=scale_dtype)
    rounded = raw.to(scale_dtype).float()
    assert not torch.equal(rounded, raw)
    s, z = effective_qparams(raw, zero, 0, 15, scale_dtype)
    assert torch.equal(out, fake_quantize(x, s, z, 0, 15))
    # identical to training at the rounded scale in float32: rounding is invisible to the gradient
    out2, gx2, gs2, gz2 = run_lsq(x, rounded, zero, 0, 15, 0.5, grad)
    assert torch.equal(out, out2) and torch.equal(gx, gx2) and torch.equal(gs, gs2) and torch.equal(gz, gz2)


def test_low_precision_input_keeps_its_dtype():
    """bf16 x with a 0-dim scale: the math still runs in float32 (as export does), then casts back."""
    x = (torch.randn(4, 32) * 2).bfloat16()
    grad = torch.ones(4, 32, dtype=torch.bfloat16)
    out, gx, gs, _ = run_lsq(x, torch.tensor(0.3), torch.tensor(0.0), -8, 7, 1.0, grad, learn_zero=False)
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16 and gs.dtype == torch.float32
    expected = fake_quantize(x.float(), torch.tensor(0.3), torch.tensor(0.0), -8, 7).bfloat16()
    assert torch.equal(out, expected)


def test_gradcheck_where_the_function_is_smooth():
    """Clipped elements are smooth in s and flat in x, so finite differences must agree there.

    The function computes in float32 internally, hence eps / tolerances sized for float32.
    """
    x = torch.tensor([-9.0, -6.5, 7.0, 12.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    zero = torch.tensor(3.0, dtype=torch.float64)

    def fn(x_in, s_in):
        return lsq_fake_quantize(x_in, s_in, zero, 0, 15, 1.0)

    assert torch.autograd.gradcheck(fn, (x, scale), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_zero_point_gradient_only_when_asked():
    x = torch.randn(16)
    _, _, gs, gz = run_lsq(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7, 1.0, torch.ones(16), learn_zero=False)
    assert gs is not None and gz is None
    scale = torch.tensor(0.1)
    x_req = x.clone().requires_grad_(True)
    lsq_fake_quantize(x_req, scale, torch.tensor(0.0), -8, 7).sum().backward()
    assert x_req.grad is not None and scale.grad is None


@pytest.mark.parametrize(("bits", "signed"), [(4, True), (8, False), (2, True)])
def test_missing_zero_point_equals_a_zero_zero_point(bits, signed):
    qmin, qmax = quant_range(bits, signed)
    x, grad = torch.randn(6, 4, 16) * 2, torch.randn(6, 4, 16)
    scale = torch.rand(6, 4, 1) * 0.5 / qmax + 0.5 / qmax
    with_zero = run_lsq(x, scale, torch.zeros(6, 4, 1), qmin, qmax, 0.3, grad, learn_zero=False)
    x_req, scale_req = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    out = lsq_fake_quantize(x_req, scale_req, None, qmin, qmax, 0.3)
    out.backward(grad)
    assert torch.equal(out, with_zero[0]) and torch.equal(x_req.grad, with_zero[1])
    assert torch.equal(out.view(torch.int32), with_zero[0].view(torch.int32))  # bits, so the sign of 0 too
    assert (out == 0).any() and not torch.signbit(out[out == 0]).any()  # +0.0, as functional.fake_quantize gives
    assert torch.equal(scale_req.grad, with_zero[2])
