"""qat: quantization-aware training down to 4 bits.

Example:
    >>> import qat
    >>> model, report = qat.prepare(model, qat.QuantSpec())      # int4 LSQ weights, groups of 128
    >>> qat.calibrate(model, calibration_batches)               # range initialization
    >>> ...train as usual...

The public names below are imported on first use, so `import qat.kernels` (the int4
kernels, torch only) does not pull in the training or export stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "qat.config": ["ConfigError", "LayerConfig", "QuantizerConfig", "QuantRule", "QuantSpec",
                   "default_activation_config", "default_weight_config"],
    "qat.control": ["calibrate", "calibration", "freeze", "init_weight_ranges", "quantizer_parameters",
                    "quantizers", "set_fake_quant"],
    "qat.export": ["CheckpointError", "ExportError", "SizeReport", "export_model", "load"],
    "qat.fake_quant": ["FakeQuantizer"],
    "qat.functional": ["NonFiniteError"],
    "qat.modules": ["QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantModule"],
    "qat.prepare": ["GroupSizeError", "PrepareReport", "prepare", "unprepare"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'qat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
