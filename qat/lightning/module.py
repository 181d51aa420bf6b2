"""The LightningModule that trains any model (float, or prepared for QAT) with any loss.

Quantizer scales and zero points get their own optimizer group (own learning rate, no
weight decay); biases and norm parameters get no weight decay either. Metrics come from
torchmetrics: accuracy and expected calibration error for classifiers, perplexity for
language models. The checkpoint carries the RNG states, the recipe and its hashes.

Example:
    >>> module = QATModule(prepared_model, task="classification", num_classes=10)
    >>> pl.Trainer(max_epochs=3).fit(module, datamodule=dm)
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from qat.config import ConfigError
from qat.control import quantizer_parameters
from qat.lightning.rng import collect_rng_states, restore_rng_states
from qat.recipe import OptimizerConfig

LossFn = Callable[[Tensor, Tensor], Tensor]
# A loss hook gets (input, logits, targets) of a training batch and returns named, already
# weighted loss terms to add to the task loss (distillation adds its terms this way).
LossHook = Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross entropy over the last dim for (B, C) or (B, T, C) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class QATModule(pl.LightningModule):
    """Wraps `model` for training; `evaluate` computes the task metrics on a loader.

    Args:
        model: any nn.Module mapping a batch's input to logits.
        task: 'classification' (batches (x, label)) or 'language_model' (batches (tokens, targets)).
        num_classes: classes for the classification metrics.
        optimizer: the optimizer settings (a recipe's `optimizer` section).
        loss_fn: loss(logits, targets); cross entropy by default.
        checkpoint_info: extra entries stored under "qat" in every checkpoint (recipe, hashes).
    """

    def __init__(
        self,
        model: nn.Module,
        task: str = "classification",
        num_classes: Optional[int] = None,
        optimizer: Optional[OptimizerConfig] = None,
        loss_fn: LossFn = cross_entropy,
        checkpoint_info: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.model, self.task, self.loss_fn = model, task, loss_fn
        self.optimizer_config = optimizer or OptimizerConfig()
        self.checkpoint_info = dict(checkpoint_info or {})
        self.num_classes = num_classes
        self.val_metrics = self._make_metrics(task, num_classes)
        self.loss_hooks: list[LossHook] = []
        self.task_loss_weight = 1.0  # 0: labels-free (the loss hooks alone)

    @staticmethod
    def _make_metrics(task: str, num_classes: Optional[int], sync: bool = True) -> torchmetrics.MetricCollection:
        """The task's metrics; `sync=False` computes on this process's data alone (no collective)."""
        if task == "language_model":
            return torchmetrics.MetricCollection({"ppl": torchmetrics.text.Perplexity(sync_on_compute=sync)})
        if not num_classes:
            raise ConfigError("classification needs num_classes (from the data module or the recipe)")
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro", sync_on_compute=sync),
            "ece": torchmetrics.classification.MulticlassCalibrationError(num_classes, n_bins=15,
                                                                          sync_on_compute=sync),
        })

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _update_metrics(self, metrics: torchmetrics.MetricCollection, logits: Tensor, targets: Tensor) -> None:
        if self.task == "language_model":
            metrics.update(logits.float(), targets)
        else:
            metrics.update(logits.float().softmax(-1), targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        terms = self.loss_terms(x, y, self(x))
        loss = sum(terms.values()) if len(terms) > 1 else next(iter(terms.values()))
        if self.loss_hooks:
            self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, on_step=True,
                          on_epoch=False)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def loss_terms(self, x: Tensor, y: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """Named loss terms of a training batch: the task loss (times `task_loss_weight`, left
        out when that is 0) and those of every `loss_hooks` entry."""
        terms: dict[str, Tensor] = {}
        if self.task_loss_weight:
            task = self.loss_fn(logits, y)
            terms["task"] = task if self.task_loss_weight == 1.0 else self.task_loss_weight * task
        for hook in self.loss_hooks:
            terms.update(hook(x, logits, y))
        if not terms:
            raise RuntimeError("no loss term: task_loss_weight is 0 (labels-free) and no loss hook gave a term")
        return terms

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True, sync_dist=True)
        self._update_metrics(self.val_metrics, logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Task metrics and mean loss over `batches`, in eval mode, outside the Trainer.

        Computed from `batches` alone on this process (no cross-rank sync): under DDP every
        rank evaluates the same batches, and rank 0 may evaluate alone (the exported model)."""
        was_training = self.training
        self.eval()
        metrics = self._make_metrics(self.task, self.num_classes, sync=False).to(self.device)
        total, count = 0.0, 0
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            logits = self(x)
            total += float(self.loss_fn(logits, y)) * len(x)
            count += len(x)
            self._update_metrics(metrics, logits, y)
        self.train(was_training)
        result = {k: float(v) for k, v in metrics.compute().items()}
        result["loss"] = total / max(count, 1)
        return result

    def configure_optimizers(self):
        cfg = self.optimizer_config
        quant_ids = {id(p) for p in quantizer_parameters(self.model)}
        decay, no_decay, quant = [], [], []
        for param in self.model.parameters():
            if id(param) in quant_ids:
                quant.append(param)
            elif param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay, "name": "weights"},
            {"params": no_decay, "weight_decay": 0.0, "name": "biases_norms"},
            {"params": quant, "weight_decay": 0.0, "lr": cfg.quantizer_lr or cfg.lr, "name": "quantizers"},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            optimizer_class = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(groups, lr=cfg.lr)
        if cfg.schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoint extras --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["qat"] = {
            **self.checkpoint_info,
            "rng": collect_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("qat", {})
        mine = self.checkpoint_info.get("quant_spec_hash")
        theirs = saved.get("quant_spec_hash")
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(
                "cannot resume: the recipe's quantization spec (quant.*) differs from the checkpoint's "
                f"(hash {mine} vs {theirs}); resume with the original spec or start a new run"
            )
        rng = saved.get("rng")
        if rng:
            restore_rng_states(rng)
