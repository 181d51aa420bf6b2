"""Quantization telemetry: per-layer weight SQNR, clipped fraction and scale drift.

Every `every_n_steps` optimizer steps, for each weight quantizer that is on:

    sqnr_db       10 * log10(||w||^2 / ||w - w_hat||^2)    (higher is better)
    clipped       fraction of weights outside the representable range
    scale_drift   mean |s - s0| / s0, s0 being the scale when telemetry first saw the layer

Computed from the weights alone (no extra forward), under no_grad: cheap.

Example:
    >>> trainer = pl.Trainer(callbacks=[QuantTelemetry(every_n_steps=50)])
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from qat.fake_quant import FakeQuantizer, whole_tensor
from qat.functional import expand_qparam, fake_quantize, grouped_view
from qat.modules import QuantModule


@torch.no_grad()
def weight_stats(weight: Tensor, quantizer: FakeQuantizer) -> dict[str, float]:
    """SQNR (dB) and clipped fraction of `weight` under `quantizer`'s current qparams."""
    c = quantizer.config
    scale, zero = quantizer.qparams()
    view = grouped_view(weight.detach().float(), quantizer.granularity, quantizer.group_size, quantizer.axis)
    s = expand_qparam(scale, quantizer.granularity, view.dim(), quantizer.axis)
    z = expand_qparam(zero, quantizer.granularity, view.dim(), quantizer.axis)
    raw = torch.round(view / s) + z
    clipped = ((raw < c.qmin) | (raw > c.qmax)).float().mean()
    noise = (view - fake_quantize(view, s, z, c.qmin, c.qmax)).square().sum()
    signal = view.square().sum()
    sqnr = 10 * math.log10(max(float(signal), 1e-30) / max(float(noise), 1e-30))
    return {"sqnr_db": sqnr, "clipped": float(clipped)}


class QuantTelemetry(pl.Callback):
    """Logs `quant/<layer>/<stat>` and the means `quant/mean_<stat>` every N steps."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self.initial_scales: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps:
            return
        stats = self.collect(pl_module.model)
        if stats:
            pl_module.log_dict(stats, on_step=True, on_epoch=False)

    def collect(self, model: torch.nn.Module) -> dict[str, float]:
        """The telemetry figures for every active weight quantizer of `model`."""
        stats: dict[str, float] = {}
        per_stat: dict[str, list[float]] = {"sqnr_db": [], "clipped": [], "scale_drift": []}
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None) if isinstance(module, QuantModule) else None
            if quantizer is None or not quantizer.enabled:
                continue
            # the weight the quantizer acts on (a folded BN's conv: W * gamma / sigma); whole: also under FSDP2
            layer = weight_stats(whole_tensor(module.export_weight()), quantizer)
            scale = quantizer.qparams()[0]
            start = self.initial_scales.setdefault(name, scale.clone())
            layer["scale_drift"] = float(((scale - start).abs() / start).mean())
            for key, value in layer.items():
                stats[f"quant/{name}/{key}"] = value
                per_stat[key].append(value)
        for key, values in per_stat.items():
            if values:
                stats[f"quant/mean_{key}"] = sum(values) / len(values)
        return stats

    def state_dict(self) -> dict:
        return {"initial_scales": self.initial_scales}

    def load_state_dict(self, state: dict) -> None:
        self.initial_scales = dict(state.get("initial_scales", {}))
