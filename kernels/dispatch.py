"""One entry point for int4 linear layers: picks a backend by device, M and shape.

`QAT_KERNEL_BACKEND=<name>` in the environment, or `backend=<name>`, forces one.
Backends register themselves in `BACKENDS`; every one has the signature of
`reference.int4_linear_reference` and is tested against it.

Example:
    >>> y = int4_linear(x, packed, scales, zeros, group_size=128)
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from torch import Tensor

from .reference import int4_linear_reference

Int4Linear = Callable[..., Tensor]

BACKENDS: dict[str, Int4Linear] = {"reference": int4_linear_reference}
ENV_VAR = "QAT_KERNEL_BACKEND"


def choose_backend(x: Tensor, packed: Tensor, group_size: int) -> str:
    """The backend name for these inputs (the fastest correct one available)."""
    return "reference"


def int4_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    group_size: int,
    bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """y = x @ W.T + bias for int4 weights in the canonical layout (see reference.py)."""
    name = backend or os.environ.get(ENV_VAR) or choose_backend(x, packed, group_size)
    if name not in BACKENDS:
        raise ValueError(f"unknown int4 kernel backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](x, packed, scales, zeros, group_size, bias)
