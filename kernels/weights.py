"""One int4 layer's weights: checked once, kernel-specific forms built at load time and cached.

The stored (canonical) layout is the one in reference.py: packed uint8 (N, K // 2), low
nibble = even k; scales (N, K // group_size); zeros (N, K // group_size) uint8 or None
(meaning 8). Fast kernels want other layouts (torch's CPU int4pack tiles, a dequantized
copy); `PackedInt4Weight.form(name, build)` builds each one the first time it is asked for
and keeps it, so a deployment pays the repack once per layer, never per call, and never
stores it in a checkpoint.

Every backend takes a PackedInt4Weight; choosing and running a backend is dispatch.py's job
(its `prepare_weights` also builds a chosen backend's form at load time).

Example:
    >>> weight = PackedInt4Weight(packed, scales, zeros, group_size=128)
    >>> y = dispatch.int4_linear_prepared(x, weight)    # same as dispatch.int4_linear(x, packed, ...)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .reference import SYMMETRIC_ZERO

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int4_layout(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> None:
    """Raise a ValueError/TypeError naming the problem if the tensors are not the canonical int4 layout."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D uint8 tensor (N, K // 2), got {packed.dtype} {tuple(packed.shape)}")
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size!r} must be a positive int dividing K = {in_features}")
    groups = (out_features, in_features // group_size)
    if scales.dtype not in SCALE_DTYPES:
        raise TypeError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if tuple(scales.shape) != groups:
        raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {groups} (N, K // group_size)")
    if zeros is not None:
        if zeros.dtype != torch.uint8:
            raise TypeError(f"zeros must be uint8 stored codes or None, got {zeros.dtype}")
        if tuple(zeros.shape) != groups:
            raise ValueError(f"zeros have shape {tuple(zeros.shape)}, expected {groups} (N, K // group_size)")
    for name, tensor in (("scales", scales), ("zeros", zeros)):
        if tensor is not None and tensor.device != packed.device:
            raise ValueError(f"{name} are on {tensor.device} but packed is on {packed.device}")


def check_activation(x: Tensor, in_features: int, bias: Optional[Tensor], out_features: int) -> None:
    """Raise if x (..., K) or bias (N,) do not fit a layer with these features."""
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be K = {in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")


def _version_signature(*tensors: Optional[Tensor]) -> tuple:
    """What changes when a tensor is replaced or written in place (then cached forms are stale)."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.device) for t in tensors)


class PackedInt4Weight:
    """An int4 linear layer's weights in the canonical layout plus its cached kernel forms.

    Attributes: packed, scales, zeros, group_size, bias (as in reference.py),
    out_features (N), in_features (K). Run it with ``dispatch.int4_linear_prepared(x, weight, backend=None)``.
    """

    def __init__(
        self,
        packed: Tensor,
        scales: Tensor,
        zeros: Optional[Tensor],
        group_size: int,
        bias: Optional[Tensor] = None,
    ) -> None:
        check_int4_layout(packed, scales, zeros, group_size)
        self.packed, self.scales, self.zeros, self.group_size, self.bias = packed, scales, zeros, group_size, bias
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self._forms: dict[str, Any] = {}
        self._signature = _version_signature(packed, scales, zeros)
        # the backend the `auto` dispatch chose, per (activation dtype, device, M, its settings): a decode
        # step calls every layer with the same M, so the choice and its checks run once, not per token
        self.auto_choices: dict[tuple, str] = {}

    def form(self, name: str, build: Callable[[PackedInt4Weight], Any]) -> Any:
        """The cached kernel-specific form `name`, built by `build(self)` on first use.

        Forms are dropped when packed/scales/zeros were written in place since they were built.
        """
        signature = _version_signature(self.packed, self.scales, self.zeros)
        if signature != self._signature:
            self._forms.clear()
            self._signature = signature
        if name not in self._forms:
            self._forms[name] = build(self)
        return self._forms[name]

    def drop_forms(self) -> None:
        """Forget every cached form (frees the memory of repacked or dequantized copies)."""
        self._forms.clear()

    def __repr__(self) -> str:
        zeros = "None" if self.zeros is None else "uint8"
        return (
            f"PackedInt4Weight(out_features={self.out_features}, in_features={self.in_features}, "
            f"group_size={self.group_size}, scales={self.scales.dtype}, zeros={zeros}, forms={sorted(self._forms)})"
        )


FLOAT_QPARAMS = "float_qparams"  # the form name of `float_qparams`, shared by the compiled CPU paths


def float_qparams(weight: PackedInt4Weight) -> tuple[Tensor, Tensor]:
    """(scales, zeros) as contiguous float32 (N, G), zeros 8 for symmetric layers: what the compiled CPU kernels
    (kernels/csrc) read. Keep it per layer with `weight.form(FLOAT_QPARAMS, float_qparams)` (N x G x 8 bytes)."""
    scales = weight.scales.float().contiguous()
    zeros = torch.full_like(scales, SYMMETRIC_ZERO) if weight.zeros is None else weight.zeros.float().contiguous()
    return scales, zeros


# Weights seen by the tensor-level API (dispatch.int4_linear) keep their cached forms on the
# packed tensor itself: the tensor and its PackedInt4Weight form a reference cycle that the
# garbage collector frees together when the layer is dropped (a WeakKeyDictionary would leak,
# since the value holds the key).
_CACHE_ATTRIBUTE = "_qat_int4_weight"


def cached_weight(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> PackedInt4Weight:
    """The PackedInt4Weight for these tensors, reusing the one made for the same `packed` tensor."""
    weight = getattr(packed, _CACHE_ATTRIBUTE, None)
    if weight is None or weight.scales is not scales or weight.zeros is not zeros or weight.group_size != group_size:
        weight = PackedInt4Weight(packed, scales, zeros, group_size)
        setattr(packed, _CACHE_ATTRIBUTE, weight)
    return weight


def auto_choices_of(packed: Tensor) -> set[str]:
    """The backends automatic dispatch has chosen so far for the layer stored in `packed` (tensor-level API)."""
    weight = getattr(packed, _CACHE_ATTRIBUTE, None)
    return set(weight.auto_choices.values()) if weight is not None else set()
