"""Lightning integration: the training module and one callback per file."""

from qat.lightning.module import QATModule
from qat.lightning.nonfinite import NonFiniteGuard, NonFiniteLossError
from qat.lightning.schedule import QuantizationSchedule
from qat.lightning.telemetry import QuantTelemetry

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "QATModule", "QuantTelemetry", "QuantizationSchedule"]
