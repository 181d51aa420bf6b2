"""Post-training rounding that uses calibration data: GPTQ for Linear weights (`qat.ptq.gptq` for one
weight, `qat.ptq.apply` for a prepared model)."""

from qat.ptq.apply import collect_second_moments, gptq_layers, gptq_round
from qat.ptq.gptq import DEFAULT_DAMPING, GPTQError, GPTQResult, gptq_quantize, inverse_cholesky

__all__ = [
    "DEFAULT_DAMPING",
    "GPTQError",
    "GPTQResult",
    "collect_second_moments",
    "gptq_layers",
    "gptq_quantize",
    "gptq_round",
    "inverse_cholesky",
]
