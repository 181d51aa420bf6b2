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

from typing import Optional

import torch
from torch import Tensor

from qat.functional import effective_qparams, effective_scale


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
    """Forward and backward in a few in-place passes over float32 buffers.

    Measured on the CPU this project runs on: comparisons and `where` that produce or
    read bool tensors were 4-10x slower per element than float arithmetic, and each new
    buffer costs about twice an in-place pass. So the clipping mask is a 0/1 float
    (`torch.eq` into a float buffer), the backward reuses three buffers, and a missing
    zero point (symmetric codes) skips its two passes. See benchmarks/training/train_step.md.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, scale_dtype):
        if zero_point is None:
            s, z = effective_scale(scale, scale_dtype), None
        else:
            s, z = effective_qparams(scale, zero_point, qmin, qmax, scale_dtype)
        ctx.save_for_backward(x, s, z)
        ctx.qrange = (qmin, qmax)
        ctx.grad_factor = grad_factor
        ctx.shapes = (scale.shape, None if zero_point is None else zero_point.shape)
        # functional.fake_quantize's ops, in place. x.float(): a 0-dim (per-tensor) scale
        # would not promote a bf16 / fp16 x to float32.
        out = torch.div(x.float(), s).round_()
        # with no zero point, + 0.0 still turns round's -0.0 into +0.0, as functional's "+ zero_point" does
        out = out.add_(0.0).clamp_(qmin, qmax) if z is None else out.add_(z).clamp_(qmin, qmax).sub_(z)
        return out.mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        scale_shape, zero_shape = ctx.shapes
        grad = grad.float()
        v = x.float() / s
        codes = torch.round(v) if z is None else torch.round(v).add_(z)  # before clamping
        clamped = codes.clamp(qmin, qmax)
        inside = torch.eq(codes, clamped, out=codes)  # 1.0 inside, 0.0 where clipped
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            ds = clamped if z is None else clamped.sub_(z)
            ds = ds.addcmul_(v, inside, value=-1)  # r - v inside, qmin - z / qmax - z clipped
            grad_scale = ds.mul_(grad).sum_to_size(scale_shape) * ctx.grad_factor
        grad_x = inside.mul_(grad)
        if ctx.needs_input_grad[2]:
            grad_clipped = torch.sub(grad, grad_x, out=v)  # exact: grad where clipped, 0 inside
            grad_zero = _sum_times_scale(grad_clipped, s, zero_shape) * -ctx.grad_factor
        grad_x = grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_scale, grad_zero, None, None, None, None


def _sum_times_scale(values: Tensor, s: Tensor, shape: torch.Size) -> Tensor:
    """sum(values * s) down to `shape`; sums first when `s` already has that shape (one pass less)."""
    if s.shape == shape:
        return values.sum_to_size(shape) * s
    return values.mul_(s).sum_to_size(shape)


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor],
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fake-quantize `x` with learnable `scale` (and `zero_point`, if it requires grad).

    `scale` and `zero_point` must broadcast against `x` (see `functional.grouped_view`);
    `zero_point=None` means a zero point of 0 (symmetric codes) and saves two passes.
    The forward value equals `functional.fake_quantize(x, *effective_qparams(...))`; the
    scale's rounding to `scale_dtype` and its clamping pass the gradient straight through.
    """
    return _LSQFakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor, scale_dtype)


def lsq_grad_factor(elements_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp), N counted per scale."""
    return float((elements_per_scale * max(qmax, 1)) ** -0.5)
