"""The error every converter raises for what its target cannot represent exactly."""

from __future__ import annotations

from qat.export.format import ExportError


class ConversionError(ExportError):
    """The qat file holds something the target format cannot represent exactly."""


def refuse(target: str, layer: str, reason: str) -> ConversionError:
    """The error for a layer a converter cannot represent: names the target, the layer and the reason."""
    return ConversionError(f"cannot convert to {target}: layer '{layer}': {reason}")
