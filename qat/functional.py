"""Pure quantization math: ranges, qparams, quantize, dequantize, fake-quantize.

Conventions (shared by training and export, so they agree bit for bit):

    code  = clamp(round(x / scale) + zero_point, qmin, qmax)      # round half to even
    x_hat = (code - zero_point) * scale

`zero_point` holds integer values (stored as float); it is 0 for symmetric settings.
`scale` and `zero_point` broadcast against `x`: use `grouped_view` to lay a tensor
out so that the stored per-tensor / per-channel / per-group qparams broadcast.

Example:
    >>> scale, zero = choose_qparams(x.amin(1), x.amax(1), bits=4, symmetric=True)
    >>> x_hat = fake_quantize(x, scale[:, None], zero[:, None], -8, 7)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Smallest scale we ever use. Zero-range, constant and denormal groups get this scale,
# which keeps x / scale finite (|x| < 3.4e38 * 1e-8) and codes well defined.
SCALE_EPS = 1e-8


class NonFiniteError(ValueError):
    """A tensor handed to quantization contains NaN or infinity."""


def check_finite(x: Tensor, what: str) -> None:
    """Raise `NonFiniteError` naming `what` if `x` has NaN or inf values (a meta tensor has none to check)."""
    if not x.is_meta and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{what} has {bad} non-finite value(s) (NaN or inf); cannot quantize it")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of `bits`-bit codes: signed [-2^(b-1), 2^(b-1)-1], else [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparam_shape(shape: torch.Size | tuple, granularity: str, group_size: int = 0, axis: int = 0) -> tuple:
    """Shape of the scale / zero-point tensors for a tensor of `shape`.

    tensor -> (); channel -> (shape[axis],); group -> (shape[0], prod(shape[1:]) // group_size),
    groups running along the flattened trailing (input) dimensions.
    """
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (shape[axis],)
    inputs = math.prod(shape[1:])
    if group_size <= 0 or inputs % group_size:
        raise ValueError(f"group_size={group_size} does not divide input dimension {inputs} (shape {tuple(shape)})")
    return (shape[0], inputs // group_size)


def grouped_view(x: Tensor, granularity: str, group_size: int = 0, axis: int = 0) -> Tensor:
    """View `x` so that qparams of `qparam_shape(...)` broadcast against it after `expand_qparam`.

    For 'group' the result is (rows, groups, group_size); otherwise `x` itself.
    """
    if granularity == "group":
        return x.reshape(x.shape[0], -1, group_size)
    return x


def expand_qparam(p: Tensor, granularity: str, ndim: int, axis: int = 0) -> Tensor:
    """Reshape a stored qparam so it broadcasts against `grouped_view(x)` (of `ndim` dims)."""
    if granularity == "group":
        return p.unsqueeze(-1)
    if granularity == "channel":
        shape = [1] * ndim
        shape[axis] = -1
        return p.reshape(shape)
    return p


def choose_qparams(
    lo: Tensor, hi: Tensor, bits: int, symmetric: bool, signed: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the range [lo, hi] onto `bits`-bit codes.

    symmetric, signed:   scale = max(|lo|, |hi|) / qmax, zero_point = 0
    symmetric, unsigned: scale = max(hi, 0) / qmax,       zero_point = 0
    asymmetric:          the range is widened to hold 0, scale = (hi - lo) / (qmax - qmin),
                         zero_point = clamp(qmin - round(lo / scale), qmin, qmax)
    Scales are at least `SCALE_EPS`, so empty, constant and denormal ranges stay usable.
    """
    signed = symmetric if signed is None else signed
    qmin, qmax = quant_range(bits, signed)
    lo, hi = lo.float(), hi.float()
    check_finite(lo, "range minimum")
    check_finite(hi, "range maximum")
    if symmetric:
        top = torch.maximum(lo.abs(), hi.abs()) if signed else hi.clamp_min(0)
        scale = (top / qmax).clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    span = qmax - qmin
    scale = (hi - lo) / span
    # hi - lo overflows float32 for ranges near its limit: divide first there (elsewhere the formula above)
    scale = torch.where(torch.isinf(scale), hi / span - lo / span, scale).clamp_min(SCALE_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as floats of x's promoted dtype): clamp(round(x / scale) + zero_point)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Real values of integer codes: (codes - zero_point) * scale."""
    return (codes - zero_point) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  out: Tensor | None = None) -> Tensor:
    """dequantize(quantize(x)): the value the deployed integer model computes with. With `out` (x's shape
    and dtype), the same steps run in place in that buffer (no temporaries; the same values)."""
    if out is None:
        return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    torch.div(x, scale, out=out)
    return out.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def effective_qparams(
    scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """The qparams actually applied, from the raw (learnable) ones.

    The scale is clamped to [max(SCALE_EPS, smallest normal of scale_dtype), largest
    finite of scale_dtype] and rounded to `scale_dtype` (the dtype export stores it in),
    then computed with in float32; the zero point is rounded into [qmin, qmax].
    Training and export both go through this function, so they agree bit for bit.
    """
    return effective_scale(scale, scale_dtype), torch.round(zero_point.float()).clamp(qmin, qmax)


def effective_scale(scale: Tensor, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """The scale part of `effective_qparams`: clamped, rounded to `scale_dtype`, as float32."""
    info = torch.finfo(scale_dtype)
    return scale.float().clamp(min=max(SCALE_EPS, info.tiny), max=info.max).to(scale_dtype).float()


def int8_weight_multiplier(bits: int, symmetric: bool) -> int:
    """The power of two k such that weight codes (minus their zero) times k stay within +-64: 8 for symmetric
    4-bit weights.

    An integer runtime stores the codes as int8 `code * k` with scale `scale / k` (the same reals), which makes
    the grid of its int32 bias, input scale x weight scale, k times finer; +-64 keeps x86's u8 x s8 16-bit
    pair sums (vpmaddubsw, machines without VNNI) from saturating: 255 * 64 * 2 = 32640 <= 32767. The
    integer bias of QAT (`QuantSpec.integer_bias`) and `qat export --to onnx --integer` both use it."""
    largest = 2 ** (bits - 1) if symmetric else 2**bits - 1
    fits = 64 // largest
    return 1 << (fits.bit_length() - 1) if fits >= 1 else 1  # a power of two: scale / k is exact

