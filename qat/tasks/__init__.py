"""Tasks: how a batch is split, fed to the model, scored and measured.

The Lightning module, calibration, distillation and evaluation all go through one `Task`,
so a recipe's model may take a tensor (the shipped toys) or keyword inputs and return an
output object (Hugging Face models). One module per kind:

    classification   qat.tasks.classification (also the helpers every task shares)
    language_model   qat.tasks.language
    causal_lm        qat.tasks.language
    embedding        qat.tasks.embedding

Example:
    >>> task = make_task("causal_lm")
    >>> inputs, targets = task.split(batch)
    >>> loss = task.loss(task.forward(model, inputs), targets, inputs)
"""

from __future__ import annotations

from typing import Optional

from qat.config import ConfigError
from qat.tasks.classification import IGNORE, Task, logits_of, model_output, move_batch
from qat.tasks.embedding import EmbeddingAgreement, EmbeddingTask, nearest_neighbours
from qat.tasks.language import CausalLMTask, LanguageModelTask, shifted_targets

TASKS = {task.name: task for task in (Task, LanguageModelTask, CausalLMTask, EmbeddingTask)}


def make_task(name: str, num_classes: Optional[int] = None) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not valid; allowed: {', '.join(map(repr, TASKS))}")
    return TASKS[name](num_classes)


__all__ = [
    "IGNORE",
    "TASKS",
    "CausalLMTask",
    "EmbeddingAgreement",
    "EmbeddingTask",
    "LanguageModelTask",
    "Task",
    "logits_of",
    "make_task",
    "model_output",
    "move_batch",
    "nearest_neighbours",
    "shifted_targets",
]
