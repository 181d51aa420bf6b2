"""The one place that calls a model for evaluation: batches in, (logits, labels) out.

Batches are split, fed and scored by the run's task (`qat.tasks`: classification,
language_model, causal_lm, embedding); without a task a batch is `(input, labels)` or a dict
with `input_ids` and `labels`. A model returns logits or an object with `.logits` (an encoder:
`.last_hidden_state`, pooled by the 'embedding' task). Everything downstream (metrics,
report) sees plain tensors.

Example:
    >>> out = collect(model, loader)          # out.logits (N, C), out.labels (N,)
    >>> metrics.accuracy(out.logits, out.labels)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from qat.tasks import Task, logits_of, model_output


class EvalError(ValueError):
    """An evaluation input is unusable (wrong file, no float reference, data that does not fit)."""


@dataclass
class Outputs:
    """A model's outputs over a dataset: logits (N, C) and labels (N,), rows flattened
    (a language model's (B, T, V) becomes (B*T, V)); rows whose label is -100 dropped."""

    logits: Tensor
    labels: Tensor

    @property
    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(-1)

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """(model input, labels) of a tuple/list batch or a dict batch with 'labels'."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise EvalError(f"a dict batch needs 'labels'; it has {sorted(batch)}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise EvalError(f"a batch must be (input, labels) or a dict with 'labels'; got {type(batch).__name__}")


def call_model(model: nn.Module, inputs: Any) -> Tensor:
    """Logits of `model` on `inputs` (a tensor, or a dict of keyword tensors)."""
    return logits_of(model_output(model, inputs))


def _check_fit(logits: Tensor, labels: Tensor, describe: str) -> None:
    if logits.dim() < 2 or logits.shape[:-1].numel() != labels.numel():
        raise EvalError(f"the data does not fit the model{describe}: logits {list(logits.shape)} for labels "
                        f"{list(labels.shape)}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= logits.shape[-1]):
        raise EvalError(f"the data does not fit the model{describe}: labels range {int(valid.min())}.."
                        f"{int(valid.max())} but the model has {logits.shape[-1]} outputs")


def _forward(model: nn.Module, inputs: Any, task: Optional[Task], describe: str) -> Tensor:
    try:
        return call_model(model, inputs) if task is None else task.forward(model, inputs)
    except (RuntimeError, IndexError, ValueError) as err:
        tensor = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
        shape = list(tensor.shape) if isinstance(tensor, Tensor) else sorted(inputs)
        first = str(err).splitlines()[0]
        raise EvalError(f"the data does not fit the model{describe}: input {shape} -> {first}") from None


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, transform: Optional[Callable[[Any], Any]] = None,
            describe: str = "", task: Optional[Task] = None) -> Outputs:
    """Run `model` (eval mode) over `batches`; `transform` changes each input first (noise).

    With a `task` (`qat.tasks`), batches are split, fed and scored its way (a causal
    LM's logits are shifted against its next-token targets); without one, a batch is
    `(input, labels)` or a dict with `labels`. Raises `EvalError` naming the shapes when the
    data does not fit the model.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in batches:
            inputs, y = split_batch(batch) if task is None else task.split(batch)
            if transform is not None:
                inputs = transform(inputs)
            out = _forward(model, inputs, task, describe)
            out = out if task is None else task.scored(out)
            _check_fit(out, y, describe)
            keep = y.reshape(-1) != -100
            logits.append(out.reshape(-1, out.shape[-1]).float()[keep])
            labels.append(y.reshape(-1)[keep])
    finally:
        model.train(was_training)
    if not logits:
        raise EvalError("no evaluation batches: the data module's val_dataloader is empty")
    return Outputs(torch.cat(logits), torch.cat(labels))


@torch.no_grad()
def collect_embeddings(model: nn.Module, batches: Iterable, task: Task,
                       transform: Optional[Callable[[Any], Any]] = None, describe: str = "") -> Tensor:
    """The (N, H) sentence embeddings of `model` over `batches`, as `task` ('embedding') pools them."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for batch in batches:
            inputs, _ = task.split(batch)
            if transform is not None:
                inputs = transform(inputs)
            rows.append(_forward(model, inputs, task, describe).float())
    finally:
        model.train(was_training)
    if not rows:
        raise EvalError("no evaluation batches: the data module's val_dataloader is empty")
    return torch.cat(rows)
