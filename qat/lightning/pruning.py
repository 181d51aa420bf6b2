"""Pruning callback: gradual magnitude or N:M pruning on the cubic schedule, by optimizer step.

Before each training batch it computes the schedule's sparsity for the step about to run
(`qat.prune.cubic_sparsity`, piecewise constant between update points); when that differs
from the sparsity the masks hold, it recomputes the masks and zeroes the pruned weights.
After each batch it zeroes them again, so optimizer momentum or weight decay cannot move
them. The masks are `weight_mask` buffers (in the model's state_dict, hence in every
checkpoint); the callback's own state (the sparsity applied, the update steps) is in its
`state_dict`, so a resumed run carries on exactly. Every rank computes the same masks from
the same weights, so DDP needs no communication.

Example:
    >>> callback = Pruning(PruneConfig(enabled=True, method="nm", start_step=200, end_step=600))
    >>> pl.Trainer(callbacks=[callback]).fit(module, datamodule=dm)
    >>> print(callback.report(module.model))
"""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from torch import nn

from qat.prune import (
    SparsityReport,
    apply_masks,
    attach_masks,
    cubic_sparsity,
    select_layers,
    sparsity_report,
    update_masks,
)
from qat.recipe import PruneConfig


def pruned_layers(model: nn.Module, config: PruneConfig) -> tuple[list[str], dict[str, str]]:
    """(layers the recipe prunes, {skipped layer: reason}) for `model`."""
    group = config.m if config.method == "nm" else None
    return select_layers(model, config.layers, config.exclude, nm_group=group)


class Pruning(pl.Callback):
    """Applies `config`'s schedule to the LightningModule's `model` (see the module docstring)."""

    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        self.layers: list[str] = []
        self.skipped: dict[str, str] = {}
        self.applied_sparsity = 0.0
        self.update_steps: list[int] = []

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for at optimizer step `step`."""
        c = self.config
        return cubic_sparsity(step, c.final_sparsity, c.initial_sparsity, c.start_step, c.end_step, c.frequency)

    def attach(self, model: nn.Module) -> None:
        """Choose the layers and give them all-ones masks (idempotent; before a checkpoint is restored)."""
        self.layers, self.skipped = pruned_layers(model, self.config)
        if not self.layers:
            raise ValueError(f"pruning is on but no layer can be pruned (skipped: {self.skipped or 'none found'})")
        attach_masks(model, self.layers)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.attach(pl_module.model)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        target = self.target(step)
        if target == self.applied_sparsity:
            return
        c = self.config
        update_masks(pl_module.model, self.layers, target, c.method, c.n, c.m)
        self.applied_sparsity = target
        self.update_steps.append(step)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"prune/sparsity": sparsity_report(pl_module.model).total}, step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.applied_sparsity:
            apply_masks(pl_module.model)

    def report(self, model: nn.Module) -> SparsityReport:
        """Per-layer sparsity of `model`'s masked layers."""
        return sparsity_report(model)

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """JSON-ready figures for summary.json: method, per-layer sparsity, skipped layers."""
        pattern: Optional[str] = f"{self.config.n}:{self.config.m}" if self.config.method == "nm" else None
        return {"method": self.config.method, "pattern": pattern, **self.report(model).as_dict(),
                "skipped": dict(self.skipped), "update_steps": list(self.update_steps)}

    def state_dict(self) -> dict:
        return {"applied_sparsity": self.applied_sparsity, "update_steps": list(self.update_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.applied_sparsity = float(state["applied_sparsity"])
        self.update_steps = list(state["update_steps"])
