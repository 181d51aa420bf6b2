"""The classification task and what every task shares: moving batches, calling models, logits.

    classification   (x, label) tuples; model(x) -> (B, C) logits; cross entropy, accuracy, ECE
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from qat.config import ConfigError

IGNORE = -100


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """`batch` (a tensor, tuple/list or dict of tensors) on `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: move_batch(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(value, device) for value in batch)
    return batch


def model_output(model: nn.Module, inputs: Any) -> Any:
    """`model(**inputs)` for a dict (labels left out: qat computes the loss), else `model(inputs)`."""
    if isinstance(inputs, dict):
        return model(**{key: value for key, value in inputs.items() if key != "labels"})
    return model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits tensor of a model output (a tensor, or an object with `.logits`)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"the model returned a {type(output).__name__} without .logits; for an encoder use "
                        "task 'embedding'")
    return logits


class Task:
    """Classification on (x, label) tuples; the base of the other tasks."""

    name = "classification"
    has_loss = True

    def __init__(self, num_classes: Optional[int] = None) -> None:
        self.num_classes = num_classes
        self.reference: Optional[nn.Module] = None  # the float model, for tasks measured against it

    def split(self, batch: Any) -> tuple[Any, Any]:
        inputs, targets = batch
        return inputs, targets

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        return logits_of(model_output(model, inputs))

    def scored(self, output: Tensor) -> Tensor:
        """The logits that `targets` score, position for position (a causal LM drops its last position)."""
        return output

    def loss(self, output: Tensor, targets: Any, inputs: Any) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), targets.reshape(-1))

    def size(self, inputs: Any) -> int:
        """Samples in a batch (the weight of its mean loss)."""
        return len(inputs["input_ids"] if isinstance(inputs, dict) else inputs)

    def tokens(self, inputs: Any) -> int:
        """Tokens in a batch (throughput): unmasked tokens of dict batches, elements of token tensors."""
        if isinstance(inputs, dict):
            mask = inputs.get("attention_mask")
            return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return inputs.numel() if not inputs.is_floating_point() else len(inputs)

    def metrics(self, sync: bool = True) -> torchmetrics.MetricCollection:
        if not self.num_classes:
            raise ConfigError("classification needs num_classes (from the data module or the recipe)")
        c = self.num_classes
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.classification.MulticlassAccuracy(c, average="micro", sync_on_compute=sync),
            "ece": torchmetrics.classification.MulticlassCalibrationError(c, n_bins=15, sync_on_compute=sync),
        })

    def update(self, metrics: torchmetrics.MetricCollection, output: Tensor, targets: Any, inputs: Any) -> None:
        metrics.update(output.float().softmax(-1), targets)
