"""Lightning integration: the training module and one callback per file."""

from qat.lightning.distillation import Distillation
from qat.lightning.module import QATModule
from qat.lightning.nonfinite import NonFiniteGuard, NonFiniteLossError
from qat.lightning.pruning import Pruning
from qat.lightning.schedule import QuantizationSchedule
from qat.lightning.telemetry import QuantTelemetry

__all__ = [
    "Distillation",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "Pruning",
    "QATModule",
    "QuantTelemetry",
    "QuantizationSchedule",
]
