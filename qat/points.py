"""`QuantPoint`: a marker a model author places on a tensor that an integer runtime holds in 8 bits.

In a float model it passes its input through unchanged. `qat.prepare` swaps it for a `QuantizedPoint`
(qat.modules) that fake-quantizes the tensor with the activation setting its rules resolve for type
'QuantPoint'; the export stores that quantizer, and an integer graph (ONNX QDQ) quantizes the tensor once
at exactly this place. Use one where a tensor has several consumers (a residual input), or after an op
whose output no quantized layer takes directly (a residual sum, a pooled feature), so that training sees
the same rounding as the integer runtime.

Example:
    >>> self.project_out = QuantPoint()       # in __init__
    >>> y = self.project_out(self.project(x))  # in forward
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class QuantPoint(nn.Identity):
    """Identity in float; a per-tensor activation fake-quantizer once prepared (see the module docstring).

    Args:
        low, high: a range the tensor is known to lie in (after ReLU6: 0 and 6). Given, the prepared
            quantizer's range is fixed to it (frozen, not calibrated, not learned), so the activation
            before it is exactly the quantizer's own clamp and an integer runtime can drop it (ONNX
            Runtime removes a Clip whose range a QuantizeLinear covers). None: calibrated and learned.
    """

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None) -> None:
        super().__init__()
        if (low is None) != (high is None):
            raise ValueError("QuantPoint: give both low and high, or neither")
        if low is not None and not float(low) < float(high):
            raise ValueError(f"QuantPoint: low={low} must be below high={high}")
        self.fixed_range: Optional[tuple[float, float]] = None if low is None else (float(low), float(high))

    def forward(self, x: Tensor) -> Tensor:
        # in a model `qat.load` filled, the point holds the file's quantizer for this tensor and applies it
        quantizer = self._modules.get("input_quantizer")
        return x if quantizer is None else quantizer(x)

    def extra_repr(self) -> str:
        return "" if self.fixed_range is None else f"fixed_range={self.fixed_range}"
