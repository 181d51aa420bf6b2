"""Per-layer errors of a quantized model against its float model, worst layers first.

    weight SQNR   10 log10(||w||^2 / ||w - Q(w)||^2) of each fake-quant weight (dB)
    output SQNR   each quantized layer run on the float model's input to that same layer,
                  against the float layer's output: 10 log10(||y||^2 / ||y_q - y||^2) (dB),
                  so one layer's error is seen without the errors of the layers before it

Works for any quantized model whose layer names match the float model's: the fake-quant
model (QuantLinear, ...) and the loaded int4 model (PackedLinear, ...) alike.

Example:
    >>> rows = output_errors(float_model, int4_model, x)   # [{'layer': 'classifier.1', 'output_sqnr_db': ...}]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from qat.lightning.telemetry import weight_stats
from qat.modules import QuantModule
from qat.tasks import model_output

LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


def sqnr_db(signal: Tensor, approximation: Tensor) -> float:
    """10 log10(||signal||^2 / ||approximation - signal||^2); inf when they are equal."""
    signal, approximation = signal.detach().float(), approximation.detach().float()
    noise = float((approximation - signal).square().sum())
    power = float(signal.square().sum())
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(power, 1e-30) / noise)


@torch.no_grad()
def weight_sqnr(model: nn.Module) -> list[dict[str, Any]]:
    """Weight SQNR and clipped fraction of every quantized layer of a fake-quant model, worst first."""
    rows = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None) if isinstance(module, QuantModule) else None
        if quantizer is None:
            continue
        stats = weight_stats(module.export_weight(), quantizer)  # a folded BN's conv: W * gamma / sigma
        rows.append({"layer": name, "bits": quantizer.config.bits, "weights": module.weight.numel(),
                     "weight_sqnr_db": stats["sqnr_db"], "clipped": stats["clipped"]})
    return sorted(rows, key=lambda r: r["weight_sqnr_db"])


def _capture(model: nn.Module, inputs: Any) -> dict[str, tuple[tuple, Tensor]]:
    """Each float layer's (positional inputs, output) on one forward of `inputs`."""
    seen: dict[str, tuple[tuple, Tensor]] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:  # returns None: output unchanged
            seen.setdefault(name, (args, output))
        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in model.named_modules()
             if isinstance(module, LAYER_TYPES) and name]
    try:
        model_output(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def output_errors(float_model: nn.Module, quantized_model: nn.Module, inputs: Any) -> list[dict[str, Any]]:
    """Output SQNR (dB) and relative MSE of each layer of `quantized_model` on the float
    model's input to that layer, worst first. Layers equal to float come out as inf dB."""
    float_model.eval()
    quantized_model.eval()
    captured = _capture(float_model, inputs)
    modules = dict(quantized_model.named_modules())
    rows = []
    for name, (args, reference) in captured.items():
        layer = modules.get(name)
        if layer is None:
            continue
        output = layer(*args)
        power = float(reference.float().square().mean())
        error = float((output.float() - reference.float()).square().mean())
        rows.append({"layer": name, "type": type(layer).__name__, "output_sqnr_db": sqnr_db(reference, output),
                     "relative_mse": error / max(power, 1e-30)})
    return sorted(rows, key=lambda r: r["output_sqnr_db"])
