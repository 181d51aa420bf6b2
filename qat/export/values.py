"""Value checks on quantization tensors read from a file (after their checksums passed).

A file can be well-formed and checksummed yet hold values no exporter writes: codes
above 2^bits - 1, zero or non-finite scales, zero points outside the code range.
These would silently give wrong outputs, so the loader rejects them by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.export.format import CODES, INPUT_SCALE, INPUT_ZERO, PACKED, SCALES, ZEROS, TensorMismatchError
from qat.export.spec import LayerSpec


def _max(tensor: Tensor) -> int:
    return int(tensor.max()) if tensor.numel() else 0


def check_values(path: str, name: str, suffix: str, spec: LayerSpec, tensor: Tensor) -> None:
    """Raise `TensorMismatchError` if layer tensor `name` (role `suffix`) holds invalid values."""
    problem = _problem(suffix, spec, tensor)
    if problem:
        raise TensorMismatchError(f"{path}: tensor '{name}' {problem}")


def _problem(suffix: str, spec: LayerSpec, tensor: Tensor) -> str:
    if suffix in (PACKED, CODES, ZEROS):
        top = 2**spec.weight.bits - 1
        largest = max(_max(tensor & 0x0F), _max(tensor >> 4)) if suffix == PACKED else _max(tensor)
        return f"holds code {largest}, above {top} for {spec.weight.bits}-bit codes" if largest > top else ""
    if suffix in (SCALES, INPUT_SCALE):
        values = tensor.float()
        bad = ~(torch.isfinite(values) & (values > 0))
        return f"holds {int(bad.sum())} scale(s) that are not finite and positive" if bool(bad.any()) else ""
    if suffix == INPUT_ZERO:
        qmin, qmax = spec.input.qrange
        outside = (tensor < qmin) | (tensor > qmax)
        return f"holds zero points outside [{qmin}, {qmax}]" if bool(outside.any()) else ""
    return ""
