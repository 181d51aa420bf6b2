"""Autograd for quantization: round with a straight-through estimator, and LSQ / LSQ+.

Gradients (v = x / s, r = round(v), z = round(zero_point), c = r + z; "inside" means
qmin <= c <= qmax, "below" c < qmin, "above" c > qmax):

    d x_hat / d x = 1 inside, 0 where clipped                       (STE, Bengio et al. 2013)
    d x_hat / d s = r - v inside, qmin - z below, qmax - z above     (LSQ, Esser et al. 2019)
    d x_hat / d z = 0 inside, -s where clipped                       (LSQ+ offset, zero-point form)

Scale and zero-point gradients are summed over the elements sharing them and multiplied
by `grad_factor` (LSQ uses 1 / sqrt(elements_per_scale * qmax)). The zero point is the
LSQ+ offset in code units (beta = -s * z): rounding it keeps 0 exactly representable,
which is what an integer kernel and exact pruned zeros need.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.functional import dequantize, effective_qparams, quantize


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity gradient backward."""
    return _RoundSTE.apply(x)


class _LSQFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, scale_dtype):
        s, z = effective_qparams(scale, zero_point, qmin, qmax, scale_dtype)
        ctx.save_for_backward(x, s, z)
        ctx.qrange = (qmin, qmax)
        ctx.grad_factor = grad_factor
        ctx.shapes = (scale.shape, zero_point.shape)
        # x.float(): a 0-dim (per-tensor) scale would not promote a bf16 / fp16 x to float32
        out = dequantize(quantize(x.float(), s, z, qmin, qmax), s, z)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        scale_shape, zero_shape = ctx.shapes
        v = x.float() / s
        r = torch.round(v)
        c = r + z
        below, above = c < qmin, c > qmax
        inside = ~(below | above)
        grad_x = grad_scale = grad_zero = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad * inside).to(x.dtype)
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, r - v, torch.where(below, qmin - z, qmax - z))
            grad_scale = (grad * ds).sum_to_size(scale_shape) * ctx.grad_factor
        if ctx.needs_input_grad[2]:
            dz = torch.where(inside, torch.zeros_like(v), -s.expand_as(v))
            grad_zero = (grad * dz).sum_to_size(zero_shape) * ctx.grad_factor
        return grad_x, grad_scale, grad_zero, None, None, None, None


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fake-quantize `x` with learnable `scale` (and `zero_point`, if it requires grad).

    `scale` and `zero_point` must broadcast against `x` (see `functional.grouped_view`).
    The forward value equals `functional.fake_quantize(x, *effective_qparams(...))`; the
    scale's rounding to `scale_dtype` and its clamping pass the gradient straight through.
    """
    return _LSQFakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor, scale_dtype)


def lsq_grad_factor(elements_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp), N counted per scale."""
    return float((elements_per_scale * max(qmax, 1)) ** -0.5)
