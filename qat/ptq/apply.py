"""GPTQ rounding of a prepared model's Linear layers from calibration batches (see `qat.ptq.gptq`).

    1. one pass over the batches with weight fake-quant off (float weights; activation quantizers as
       they are): a forward pre-hook on every quantized Linear adds X^T X of its inputs (each batch's in
       float32, twice as fast as float64 on CPUs; the sum over batches in float64);
       with a dict batch holding an `attention_mask` (B, T), padding tokens are left out of layers whose
       input is (B, T, K)
    2. each Linear's weight is GPTQ-rounded with H = X^T X / tokens; the weight is replaced by the
       updated weights and its quantizer's scale and zero point set, so the fake-quant weight is GPTQ's

Only Linear layers are rounded this way; Embedding and Conv2d layers keep their range initialization
(round-to-nearest). Run it after `qat.calibrate` (which re-initializes weight ranges from the weights).

Example:
    >>> calibrate(model, batches)
    >>> losses = gptq_round(model, batches)     # {'encoder.layer.0.attention.self.query': 0.012, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor, nn

from qat.control import forward_batch
from qat.modules import QuantLinear
from qat.ptq.gptq import DEFAULT_DAMPING, GPTQError, gptq_quantize


class _SecondMoment:
    """Running sum of x^T x over the tokens a layer sees, and the token count."""

    def __init__(self, name: str, features: int, device: torch.device) -> None:
        self.name = name
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)  # (K, K)
        self.tokens = 0

    def add(self, x: Tensor, token_mask: Optional[Tensor]) -> None:
        if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
            x = x[token_mask.bool()]  # (tokens, K): padding left out
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
        self.sum += (rows.T @ rows).double()  # one batch in float32, the running sum over batches in float64
        self.tokens += rows.shape[0]

    def hessian(self) -> Tensor:
        if self.tokens == 0:
            raise GPTQError(f"layer '{self.name}' saw no calibration inputs: GPTQ needs them (is the layer used "
                            f"in the forward pass? skip it with a quant rule, or round it to nearest)")
        return self.sum / self.tokens


def gptq_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The quantized Linear layers with an enabled weight quantizer, by name; refuses what GPTQ cannot round
    in place (pruning masks, a weight shared by several layers, sharded weights)."""
    layers, owners = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or module.weight_quantizer is None:
            continue
        if not module.weight_quantizer.enabled:
            continue
        if "weight_mask" in module._buffers:
            raise GPTQError(f"layer '{name}' has a pruning mask: GPTQ rounding with pruning is not supported")
        if hasattr(module.weight, "device_mesh"):
            raise GPTQError(f"layer '{name}' has a sharded weight: GPTQ rounding runs on whole weights only")
        if id(module.weight) in owners:
            raise GPTQError(f"layers '{owners[id(module.weight)]}' and '{name}' share one weight: GPTQ would "
                            f"round it twice; keep one of them out of GPTQ with a quant rule")
        owners[id(module.weight)] = name
        layers[name] = module
    return layers


@torch.no_grad()
def collect_second_moments(model: nn.Module, layers: dict[str, QuantLinear], batches: Iterable) -> dict:
    """{name: _SecondMoment} of each layer's inputs over `batches`, weight fake-quant off, model in eval mode."""
    moments = {name: _SecondMoment(name, m.in_features, m.weight.device) for name, m in layers.items()}
    state: dict[str, Optional[Tensor]] = {"mask": None}
    hooks = [module.register_forward_pre_hook(lambda _m, args, moment=moments[name]:
                                              moment.add(args[0], state["mask"]))
             for name, module in layers.items()]
    quantizers = [module.weight_quantizer for module in layers.values()]
    was_training = model.training
    model.eval()
    try:
        for quantizer in quantizers:
            quantizer.enable(False)
        for batch in batches:
            state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            forward_batch(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        for quantizer in quantizers:
            quantizer.enable(True)
        model.train(was_training)
    return moments


@torch.no_grad()
def gptq_round(model: nn.Module, batches: Iterable, damping: float = DEFAULT_DAMPING,
               act_order: bool = False) -> dict[str, float]:
    """GPTQ-round every quantized Linear of `model` on `batches`; returns each layer's proxy loss.
    `act_order`: columns by decreasing input energy, group ranges static (see `qat.ptq.gptq`).

    Raises `GPTQError` naming the layer for a layer with no inputs, a non-finite H, a shared weight,
    a pruning mask or a group size that does not divide the layer."""
    if not damping > 0:
        raise GPTQError(f"damping={damping!r} must be > 0 (a share of H's mean diagonal; the paper uses 0.01)")
    layers = gptq_layers(model)
    moments = collect_second_moments(model, layers, list(batches))
    losses = {}
    for name, module in layers.items():
        quantizer = module.weight_quantizer
        static = None  # act-order's group ranges: the quantizer's own when it set them from this very weight
        if act_order and quantizer.config.granularity == "group" and quantizer.ranges_from(module.weight):
            static = quantizer.qparams()
        result = gptq_quantize(module.weight, moments[name].hessian(), quantizer.config, damping, f"layer '{name}'",
                               act_order, static)
        module.weight.copy_(result.weight)
        quantizer.set_qparams(result.scale, result.zero_point)
        losses[name] = result.loss
    return losses
