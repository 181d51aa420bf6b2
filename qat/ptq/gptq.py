"""GPTQ / OPTQ weight rounding for one Linear weight (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"), written for qat's fake-quant parametrization.

Round-to-nearest minimizes each weight's own error; GPTQ minimizes the layer's output error on its
calibration inputs X (rows are tokens, K columns):

    || X W^T - X Q^T ||^2 = sum_rows (w - q) H (w - q)^T,   H = X^T X / tokens       (K, K)

Columns are quantized in order; the error of column j, divided by the j-th diagonal entry of U (the upper
Cholesky factor of H^-1), is fed back into the columns not yet quantized, weighted by row j of U (the
optimal update of the Optimal Brain Surgeon step). H gets `damping` times its mean diagonal added first,
as in the paper (1%), so that it is well conditioned; inputs that are never active (a zero diagonal
entry) get a diagonal of 1 there, so their columns are rounded to nearest and feed back nothing.

Groups ("lazy" group ranges, the paper's reference code without act-order): the scale and zero point of a
group of `group_size` columns are chosen when the loop reaches the group's first column, by the config's
range initialization (`init`: min-max, percentile or MSE search) on that group's weights *as updated by the
error feedback of every earlier column*. Blocks of lazy updates are one group wide, so a group's weights
are fully updated when its range is chosen. Per-channel and per-tensor settings take their range from the
original weight, as qat's own initialization does.

Act-order (`act_order=True`, the reference code's `desc_act` with static groups): columns are quantized in
order of decreasing H diagonal, the inputs with the most energy first, while the most columns are still free
to absorb their error. Groups stay contiguous runs of `group_size` original columns (the stored format), so
their ranges are fixed before the loop, from the original weight by `init`: the ranges round-to-nearest
would use (a caller that holds them already, a quantizer initialized from this very weight, passes them as
`static_ranges` and skips the search). On MiniLM (int4 g128 asymmetric, 48 calibration batches) this lowers
1 - cosine of the sentence embeddings from 0.0134 to 0.0108 before any training (measured in
benchmarks/models/hf-models.md, MiniLM: GPTQ act-order).

The result fits the fake-quant module exactly: the weight is replaced by the updated weights (column j as it
was when it was quantized), and round-to-nearest of that weight with the (effective) scales and zero points
gives exactly GPTQ's codes, because both compute `functional.quantize` on the same float32 values.

Example:
    >>> result = gptq_quantize(linear.weight, hessian, QuantizerConfig(bits=4, symmetric=False, group_size=128))
    >>> result.weight, result.scale, result.zero_point, result.codes   # (N, K), (N, G), (N, G), (N, K)
    >>> gptq_quantize(linear.weight, hessian, config, act_order=True)   # columns by decreasing H diagonal
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qat.config import QuantizerConfig
from qat.functional import check_finite, dequantize, effective_qparams, quantize
from qat.observers import make_observer, to_rows

DEFAULT_DAMPING = 0.01  # of the mean diagonal of H (the paper's 1%)
UNGROUPED_BLOCK = 128  # columns per lazy update when the range does not change along a row (the paper's B)


class GPTQError(ValueError):
    """GPTQ cannot run on this layer (shapes, non-finite statistics, a singular H); the message names it."""


@dataclass
class GPTQResult:
    """The rounded layer: `weight` (N, K) to store, `scale` / `zero_point` in the quantizer's qparam shape
    (effective values: already rounded to the scale dtype and to integer zero points), `codes` (N, K)
    integer codes as float32, and the proxy loss sum((w - q) H (w - q)^T) / 2 per column summed."""

    weight: Tensor
    scale: Tensor
    zero_point: Tensor
    codes: Tensor
    loss: float


def inverse_cholesky(hessian: Tensor, damping: float = DEFAULT_DAMPING, name: str = "layer") -> Tensor:
    """U (K, K) float64, upper triangular with U^T U = (H + damping * mean(diag H) * I)^-1; dead inputs
    (zero diagonal) get a diagonal of 1 first. Raises `GPTQError` naming `name` when H is not usable."""
    h = hessian.detach().double().clone()
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise GPTQError(f"{name}: the input second moment must be square (K, K), got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise GPTQError(f"{name}: the input second moment H has non-finite values (NaN or inf in its inputs)")
    diag = h.diagonal()
    diag[diag == 0] = 1.0  # an input never active: its column is rounded to nearest and feeds back nothing
    diag += damping * diag.mean()
    factor, info = torch.linalg.cholesky_ex(h)
    if info != 0:
        raise GPTQError(f"{name}: H + damping is not positive definite (damping={damping}); raise the damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def _range(config: QuantizerConfig, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Effective (scale, zero_point) of the config's range initialization, one per row of `rows`."""
    observer = make_observer(config, (rows.shape[0],)).to(rows.device)
    observer.update(rows)
    scale, zero = observer.qparams()
    return effective_qparams(scale, zero, config.qmin, config.qmax, config.torch_scale_dtype)


def _fixed_qparams(config: QuantizerConfig, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, zero) of shape (N,) from the original weight, for settings without groups."""
    rows = weight.shape[0]
    if config.granularity == "tensor":
        scale, zero = _range(config, to_rows(weight, "tensor"))
        return scale.expand(rows), zero.expand(rows)
    return _range(config, to_rows(weight, "channel"))


def _check_inputs(weight: Tensor, hessian: Tensor, config: QuantizerConfig, name: str) -> None:
    if weight.dim() != 2:
        raise GPTQError(f"{name}: GPTQ rounds 2-D (N, K) weights, got shape {tuple(weight.shape)}")
    check_finite(weight, f"{name}: weight")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise GPTQError(f"{name}: H has shape {tuple(hessian.shape)}, the weight needs ({k}, {k})")
    if config.granularity == "group" and k % config.group_size:
        raise GPTQError(f"{name}: group_size={config.group_size} does not divide in_features={k}")


def _static_group_qparams(config: QuantizerConfig, weight: Tensor,
                          given: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """(scale, zero) of shape (N, G): each group's range from the original weight (act-order's static groups),
    or the `given` effective ones (N * G values each) of that same range initialization."""
    if given is not None:
        scale, zero = given
    else:
        scale, zero = _range(config, to_rows(weight, "group", config.group_size))  # one search over N * G groups
    groups = weight.shape[1] // config.group_size
    return scale.reshape(-1, groups), zero.reshape(-1, groups)


def activation_order(hessian: Tensor) -> Tensor:
    """Column order of act-order: decreasing diagonal of H, ties by column index (a stable sort)."""
    return torch.sort(hessian.diagonal().double(), descending=True, stable=True).indices


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, config: QuantizerConfig, damping: float = DEFAULT_DAMPING,
                  name: str = "layer", act_order: bool = False,
                  static_ranges: Optional[tuple[Tensor, Tensor]] = None) -> GPTQResult:
    """GPTQ-round `weight` (N, K) given its inputs' second moment `hessian` (K, K); see the module docstring.
    `static_ranges`: act-order's group (scale, zero), effective values of the config's range initialization
    on this `weight` (e.g. `FakeQuantizer.qparams()` when `ranges_from(weight)`); None searches them."""
    _check_inputs(weight, hessian, config, name)
    k = weight.shape[1]
    order = activation_order(hessian) if act_order else None  # (K,) original column of each step
    if order is not None:
        hessian = hessian[order][:, order]
    upper = inverse_cholesky(hessian, damping, name).float()  # (K, K), in processing order
    w = weight.detach().float().clone()  # (N, K), updated in place by the error feedback
    grouped = config.granularity == "group"
    lazy_ranges = grouped and order is None  # each group's range chosen when the loop reaches it
    if grouped and order is not None:
        static_scale, static_zero = _static_group_qparams(config, w, static_ranges)  # (N, G)
        group_of = order // config.group_size  # (K,) the group of each processed column
    elif not grouped:
        scale, zero = _fixed_qparams(config, w)
    if order is not None:
        w = w[:, order]  # columns in processing order; ranges above came from the original layout
    block = config.group_size if lazy_ranges else UNGROUPED_BLOCK
    scales, zeros = [], []
    stored, codes = torch.empty_like(w), torch.empty_like(w)
    loss = 0.0
    for start in range(0, k, block):
        end = min(start + block, k)
        if lazy_ranges:  # the group's range, from its weights as updated by every earlier column
            scale, zero = _range(config, w[:, start:end])
            scales.append(scale)
            zeros.append(zero)
        part = w[:, start:end]  # (N, B), a view: in-block updates land in w
        errors = torch.empty_like(part)
        for i in range(end - start):
            if grouped and not lazy_ranges:
                group = int(group_of[start + i])
                scale, zero = static_scale[:, group], static_zero[:, group]
            column = part[:, i].to(weight.dtype).float()  # (N,), as the weight will hold it (a copy)
            stored[:, start + i] = column
            code = quantize(column, scale, zero, config.qmin, config.qmax)
            codes[:, start + i] = code
            d = upper[start + i, start + i]
            error = (column - dequantize(code, scale, zero)) / d
            loss += float(error.square().sum()) / 2
            part[:, i:] -= error[:, None] * upper[start + i, start + i:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]  # the lazy update of the later blocks
    if order is not None:  # back to the original column order
        inverse = torch.argsort(order)
        stored, codes = stored[:, inverse], codes[:, inverse]
    if lazy_ranges:
        scale, zero = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)  # (N, G)
    elif grouped:
        scale, zero = static_scale, static_zero
    elif config.granularity == "tensor":
        scale, zero = scale[0], zero[0]
    return GPTQResult(stored.to(weight.dtype), scale, zero, codes, loss)
