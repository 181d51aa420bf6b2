"""qat: quantization-aware training down to 4 bits.

Example:
    >>> import qat
    >>> model, report = qat.prepare(model, qat.QuantSpec())      # int4 LSQ weights, groups of 128
    >>> qat.calibrate(model, calibration_batches)               # range initialization
    >>> ...train as usual...

`import qat` imports nothing heavy: each public name is imported from its module on first use (the
core needs torch, the export names safetensors too). So `import qat.kernels` (the int4 kernels) needs
torch alone, and the `qat` command builds its parser without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module it is imported from on first use.
_LAZY = {
    **dict.fromkeys(("ConfigError", "LayerConfig", "QuantizerConfig", "QuantRule", "QuantSpec",
                     "default_activation_config", "default_weight_config"), "qat.config"),
    **dict.fromkeys(("calibrate", "calibration", "freeze", "init_weight_ranges", "quantizer_parameters",
                     "quantizers", "set_fake_quant"), "qat.control"),
    "FakeQuantizer": "qat.fake_quant",
    "NonFiniteError": "qat.functional",
    **dict.fromkeys(("QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantModule"), "qat.modules"),
    **dict.fromkeys(("GroupSizeError", "PrepareReport", "prepare", "unprepare"), "qat.swap"),  # qat.prepare: a function
    **dict.fromkeys(("CheckpointError", "ExportError", "SizeReport", "export_model", "load"), "qat.export"),
}

if TYPE_CHECKING:  # the core names for type checkers and editors (qat.export imports qat for its version)
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
    if name not in _LAZY:
        raise AttributeError(f"module 'qat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
