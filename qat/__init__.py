"""qat: quantization-aware training down to 4 bits.

Example:
    >>> import qat
    >>> model, report = qat.prepare(model, qat.QuantSpec())      # int4 LSQ weights, groups of 128
    >>> qat.calibrate(model, calibration_batches)               # range initialization
    >>> ...train as usual...
"""

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
from qat.export import CheckpointError, ExportError, SizeReport, export_model, load
from qat.fake_quant import FakeQuantizer
from qat.functional import NonFiniteError
from qat.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from qat.prepare import GroupSizeError, PrepareReport, prepare, unprepare

__version__ = "0.1.0"

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
