"""What a run checks before its directory exists, and the clean-up when building fails after that.

An error found here is one line (a `ConfigError`) and leaves nothing under `logging.run_dir`: a
model whose output width is not the class count the task scores would otherwise fail inside
torchmetrics at the first validation, mid-run, with a half-written run directory behind it.

Example:
    >>> classes, source = class_count(recipe, datamodule)
    >>> check_classes(model, datamodule, make_task("classification", classes), source)
"""

from __future__ import annotations

import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from qat.config import ConfigError
from qat.control import quantizers
from qat.data.loading import main_validation_loader
from qat.recipe import Recipe
from qat.tasks import Task

DEFAULT_CLASSES = 10  # the digits: what the shipped recipes train on


def class_count(recipe: Recipe, datamodule: pl.LightningDataModule) -> tuple[Any, str]:
    """(the class count the task scores, where it came from): the data module's `num_classes`, else the
    recipe's `model.args.classes`, else 10."""
    from_data = getattr(datamodule, "num_classes", None)
    if from_data:
        return from_data, f"num_classes of the data module {type(datamodule).__name__}"
    if "classes" in recipe.model.args:
        return recipe.model.args["classes"], "model.args.classes of the recipe"
    return DEFAULT_CLASSES, (f"the default {DEFAULT_CLASSES}: the data module has no num_classes and model.args "
                             "no classes")


@contextmanager
def _untouched_state(model: nn.Module) -> Iterator[None]:
    """A probe forward that changes nothing: eval mode (BatchNorm statistics, dropout), fake-quant off (an
    enabled quantizer would take its range from the probe batch) and the RNGs as they were (a data
    loader draws its seed from torch's, a data module's setup may shuffle with any), all restored after."""
    enabled = [(quantizer, quantizer.enabled) for _, quantizer in quantizers(model)]
    training, states = model.training, (random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for quantizer, _ in enabled:
                quantizer.enable(False)
            yield model.eval()
    finally:
        model.train(training)
        for quantizer, was_enabled in enabled:
            quantizer.enable(was_enabled)
        random.setstate(states[0])
        np.random.set_state(states[1])


def check_classes(model: nn.Module, datamodule: pl.LightningDataModule, task: Task, classes_from: str) -> None:
    """Run one validation batch through `model` (as `qat eval` checks that data fits a model) and refuse,
    naming both numbers and where each came from, a model whose output width is not `task.num_classes`,
    or labels outside the classes."""
    with _untouched_state(model):
        datamodule.setup("fit")  # Lightning calls it again in fit: a data module sets itself up once
        batch = next(iter(main_validation_loader(datamodule)), None)
        if batch is None:
            return  # no validation data: nothing is scored, so nothing can disagree
        inputs, labels = task.split(batch)
        try:
            logits = task.scored(task.forward(model, inputs))
        except (RuntimeError, IndexError, ValueError, TypeError) as err:
            shape = list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ConfigError(f"the data does not fit the model: {type(model).__name__} on an input {shape} from "
                              f"{type(datamodule).__name__}: {str(err).splitlines()[0]}") from None
    width, classes = logits.shape[-1], task.num_classes
    if width != classes:
        raise ConfigError(f"the model's output width is not the class count: {type(model).__name__} gives "
                          f"{width} outputs per sample (logits {list(logits.shape)} for one validation batch), "
                          f"the task scores {classes} classes ({classes_from})")
    scored = labels[labels != -100]  # -100: positions the loss ignores
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= classes):
        raise ConfigError(f"the data does not fit the classes: labels range {int(scored.min())}.."
                          f"{int(scored.max())}, the task scores {classes} classes ({classes_from})")


def new_directories(run_dir: Path) -> list[Path]:
    """`run_dir` and its ancestors that do not exist yet, deepest first: what `mkdir(parents=True)` makes."""
    created = []
    for path in [run_dir, *run_dir.parents]:
        if path.exists():
            break
        created.append(path)
    return created


def remove_new_directories(created: list[Path]) -> None:
    """Undo `mkdir` after a failed build: the run's own directory and whatever is in it, then its new
    parents while they are empty (another run may have started in one meanwhile)."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            return
