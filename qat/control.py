"""Model-wide switches for the quantizers of a prepared model, and calibration.

Example:
    >>> with calibration(model):              # activation ranges from a few batches
    ...     for x, _ in batches: model(x)
    >>> set_fake_quant(model, activations=False)   # weight-only for a while
    >>> freeze(model)                              # stop learning scales
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from qat.fake_quant import FakeQuantizer
from qat.modules import QuantModule


def quantizers(model: nn.Module, role: Optional[str] = None) -> Iterator[tuple[str, FakeQuantizer]]:
    """(name, quantizer) pairs; `role` 'weight' or 'activation' keeps one kind."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        pairs = (("weight", module.weight_quantizer), ("activation", module.input_quantizer))
        for kind, quantizer in pairs:
            if quantizer is not None and role in (None, kind):
                attr = "weight_quantizer" if kind == "weight" else "input_quantizer"
                yield f"{name}.{attr}", quantizer


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every scale and zero point (learnable or not), for their own optimizer group; a quantizer shared
    by tied layers counts once."""
    unique = {id(q): q for _, q in quantizers(model)}
    return [p for q in unique.values() for p in (q.scale, q.zero_point)]


def set_fake_quant(model: nn.Module, weights: Optional[bool] = None, activations: Optional[bool] = None) -> None:
    """Turn weight and/or activation fake-quant on or off; None leaves a role as it is."""
    for role, on in (("weight", weights), ("activation", activations)):
        if on is not None:
            for _, quantizer in quantizers(model, role):
                quantizer.enable(on)


def freeze(model: nn.Module, frozen: bool = True, role: Optional[str] = None) -> None:
    """Freeze (or unfreeze) scales and observers of every quantizer, or of one role."""
    for _, quantizer in quantizers(model, role):
        quantizer.freeze(frozen)


@torch.no_grad()
def init_weight_ranges(model: nn.Module) -> None:
    """Range-initialize every weight quantizer from its layer's current weight."""
    for module in model.modules():
        if isinstance(module, QuantModule):
            module.init_weight_qparams()


@contextmanager
def calibration(model: nn.Module, weights: bool = True) -> Iterator[list[FakeQuantizer]]:
    """Inside: activation quantizers observe and pass values through. On exit: their
    scales and zero points are set from the observed ranges; with `weights`, weight
    quantizers are re-initialized from the current weights first. Yields the observing quantizers."""
    if weights:
        init_weight_ranges(model)
    # a frozen, initialized quantizer keeps its range (e.g. a QuantPoint's fixed range after ReLU6)
    active = [q for _, q in quantizers(model, "activation") if not (q.frozen and q.initialized)]
    for quantizer in active:
        quantizer.start_calibration()
    try:
        yield active
    finally:
        for quantizer in active:
            quantizer.finish_calibration()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, weights: bool = True) -> int:
    """Run `model` on each batch in eval mode inside `calibration`; returns the number of batches seen.

    A batch is a tensor, a tuple whose first item is the input, or a dict of keyword inputs
    (Hugging Face style; a `labels` entry is left out). A model without activation quantizers (weight-only)
    takes its ranges from its weights alone, so the batches are counted but not run."""
    was_training = model.training
    model.eval()
    seen = 0
    with calibration(model, weights=weights) as observing:
        for batch in batches:
            if observing:
                forward_batch(model, batch)
            seen += 1
    model.train(was_training)
    return seen


def forward_batch(model: nn.Module, batch: object) -> object:
    """`model` on one calibration batch: a tensor, a tuple whose first item is the input, or a dict of
    keyword inputs (a `labels` entry is left out)."""
    if isinstance(batch, dict):
        return model(**{key: value for key, value in batch.items() if key != "labels"})
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)
