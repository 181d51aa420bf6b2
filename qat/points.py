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

from torch import nn


class QuantPoint(nn.Identity):
    """Identity in float; a per-tensor activation fake-quantizer once prepared (see the module docstring)."""
