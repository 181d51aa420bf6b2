"""qat: quantization-aware training down to 4 bits.

Example:
    >>> import qat
    >>> model, report = qat.prepare(model, qat.QuantSpec())      # int4 LSQ weights, groups of 128
    >>> qat.calibrate(model, calibration_batches)               # range initialization
    >>> ...train as usual...

`import qat.kernels` (the int4 kernels) needs torch alone: the package imports its
torch-only core eagerly and the export names (they need safetensors) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# The torch-only core, imported eagerly (the function `prepare` comes from qat.swap).
from qat.config import (
    ConfigError,
    LayerConfig,
    QuantizerConfig,
    QuantRule,
    QuantSpec,
    default_activation_config,
    default_weight_config,
)
from qat.control import (
    calibrate,
    calibration,
    freeze,
    init_weight_ranges,
    quantizer_parameters,
    quantizers,
    set_fake_quant,
)
from qat.fake_quant import FakeQuantizer
from qat.functional import NonFiniteError
from qat.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from qat.swap import GroupSizeError, PrepareReport, prepare, unprepare

__version__ = "0.1.0"

_LAZY_FROM_EXPORT = ("CheckpointError", "ExportError", "SizeReport", "export_model", "load")

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "FakeQuantizer",
    "GroupSizeError",
    "LayerConfig",
    "NonFiniteError",
    "PrepareReport",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantModule",
    "QuantRule",
    "QuantSpec",
    "QuantizerConfig",
    "SizeReport",
    "calibrate",
    "calibration",
    "default_activation_config",
    "default_weight_config",
    "export_model",
    "freeze",
    "init_weight_ranges",
    "load",
    "prepare",
    "quantizer_parameters",
    "quantizers",
    "set_fake_quant",
    "unprepare",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_FROM_EXPORT:
        raise AttributeError(f"module 'qat' has no attribute {name!r}")
    value = getattr(importlib.import_module("qat.export"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
