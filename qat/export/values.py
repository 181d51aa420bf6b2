"""Value checks on quantization tensors read from a file (after their checksums passed).

A file can be well-formed and checksummed yet hold values no exporter writes: codes
above 2^bits - 1, zero or non-finite scales, zero points outside the code range.
These would silently give wrong outputs, so the loader rejects them by name. The checks
run over chunks, so their temporaries stay small next to the tensors being loaded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from qat.export.format import CODES, INPUT_SCALE, INPUT_ZERO, PACKED, SCALES, ZEROS, TensorMismatchError
from qat.export.spec import LayerSpec

CHUNK = 1 << 20  # elements per chunk


def _count(tensor: Tensor, bad: Callable[[Tensor], Tensor]) -> int:
    """How many elements satisfy `bad`, computed chunk by chunk."""
    return sum(int(bad(chunk).sum()) for chunk in tensor.reshape(-1).split(CHUNK))


def check_values(path: str, name: str, suffix: str, spec: LayerSpec, tensor: Tensor) -> None:
    """Raise `TensorMismatchError` if layer tensor `name` (role `suffix`) holds invalid values."""
    problem = _problem(suffix, spec, tensor)
    if problem:
        raise TensorMismatchError(f"{path}: tensor '{name}' {problem}")


def _problem(suffix: str, spec: LayerSpec, tensor: Tensor) -> str:
    if suffix in (PACKED, CODES, ZEROS):
        top = 2**spec.weight.bits - 1
        if suffix == PACKED and top >= 15:
            return ""  # every nibble is a valid 4-bit code
        if suffix == PACKED:
            bad = _count(tensor, lambda c: ((c & 0x0F) > top) | ((c >> 4) > top))
        else:
            bad = _count(tensor, lambda c: c > top)
        return f"holds {bad} code(s) above {top}, the largest {spec.weight.bits}-bit code" if bad else ""
    if suffix in (SCALES, INPUT_SCALE):
        bad = _count(tensor, lambda c: ~(torch.isfinite(c) & (c > 0)))
        return f"holds {bad} scale(s) that are not finite and positive" if bad else ""
    if suffix == INPUT_ZERO:
        qmin, qmax = spec.input.qrange
        bad = _count(tensor, lambda c: (c < qmin) | (c > qmax))
        return f"holds {bad} zero point(s) outside [{qmin}, {qmax}]" if bad else ""
    return ""
