"""Evaluation beyond accuracy: metrics against the float model, per-layer errors, robustness,
reports (Markdown, JSON, plots), sweeps and per-layer sensitivity with a bit-budget suggestion.

    qat eval RUN_DIR | CKPT | INT4.safetensors    ->  report.md, report.json, *.png
    qat sweep RECIPE --bits 2 4 --group-size 32 128 --method lsq observer

Metrics are plain functions on tensors (`qat.eval.metrics`); models are called in one place
(`qat.eval.outputs.collect`).
"""

from qat.eval.outputs import EvalError, Outputs, collect

__all__ = ["EvalError", "Outputs", "collect"]
