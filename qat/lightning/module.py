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

import math
from functools import partial
from typing import Any, Callable, Iterable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.config import ConfigError
from qat.control import quantizer_parameters
from qat.data.loading import domain_key, validation_names
from qat.lightning.rng import collect_rng_states, restore_rng_states
from qat.recipe import OptimizerConfig
from qat.tasks import Task, make_task, move_batch

LossFn = Callable[[Tensor, Tensor], Tensor]
# A loss hook gets (inputs, output, targets) of a training batch and returns named, already
# weighted loss terms to add to the task loss (distillation adds its terms this way).
LossHook = Callable[[Any, Tensor, Any], dict[str, Tensor]]


def lr_factor(step: int, warmup: int, total: int, cosine: bool, floor: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step `step`: linear warm-up from 1/warmup to 1 over
    `warmup` steps, then cosine decay to `floor` at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross entropy over the last dim for (B, C) or (B, T, C) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class QATModule(pl.LightningModule):
    """Wraps `model` for training; `evaluate` computes the task metrics on a loader.

    Args:
        model: any nn.Module; the task says how batches are fed to it (see `qat.tasks`).
        task: 'classification', 'language_model', 'causal_lm', 'embedding', or a `Task`.
        num_classes: classes for the classification metrics.
        optimizer: the optimizer settings (a recipe's `optimizer` section).
        loss_fn: loss(output, targets) replacing the task's own loss.
        checkpoint_info: extra entries stored under "qat" in every checkpoint (recipe, hashes).
    """

    def __init__(
        self,
        model: nn.Module,
        task: str | Task = "classification",
        num_classes: Optional[int] = None,
        optimizer: Optional[OptimizerConfig] = None,
        loss_fn: Optional[LossFn] = None,
        checkpoint_info: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.task_spec = task if isinstance(task, Task) else make_task(task, num_classes)
        self.task = self.task_spec.name
        self.optimizer_config = optimizer or OptimizerConfig()
        self.checkpoint_info = dict(checkpoint_info or {})
        self.num_classes = num_classes
        self.val_metrics = self.task_spec.metrics()
        # Validation loaders 1, 2, ... (evaluation domains, `TextDataModule(eval_corpora=...)`): their own
        # metrics, made on first use; not submodules, so checkpoints and the state dict do not change.
        self.domain_metrics: dict[int, Any] = {}
        self.loss_hooks: list[LossHook] = []
        self.task_loss_weight = 1.0 if self.task_spec.has_loss else 0.0  # 0: labels-free (the loss hooks alone)

    def forward(self, inputs: Any) -> Tensor:
        return self.task_spec.forward(self.model, inputs)

    def task_loss(self, output: Tensor, targets: Any, inputs: Any) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, targets)
        return self.task_spec.loss(output, targets, inputs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = self.task_spec.split(batch)
        terms = self.loss_terms(inputs, targets, self(inputs))
        loss = sum(terms.values()) if len(terms) > 1 else next(iter(terms.values()))
        if self.loss_hooks:
            self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, on_step=True,
                          on_epoch=False)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def loss_terms(self, inputs: Any, targets: Any, output: Tensor) -> dict[str, Tensor]:
        """Named loss terms of a training batch: the task loss (times `task_loss_weight`, left
        out when that is 0) and those of every `loss_hooks` entry."""
        terms: dict[str, Tensor] = {}
        if self.task_loss_weight:
            task = self.task_loss(output, targets, inputs)
            terms["task"] = task if self.task_loss_weight == 1.0 else self.task_loss_weight * task
        for hook in self.loss_hooks:
            terms.update(hook(inputs, output, targets))
        if not terms:
            raise RuntimeError("no loss term: task_loss_weight is 0 (labels-free) and no loss hook gave a term")
        return terms

    def _validation_names(self) -> list[str]:
        trainer = getattr(self, "_trainer", None)
        return validation_names(trainer.datamodule if trainer is not None else None)

    def _metrics_of(self, dataloader_idx: int) -> Any:
        if dataloader_idx == 0:
            return self.val_metrics
        if dataloader_idx not in self.domain_metrics:
            self.domain_metrics[dataloader_idx] = self.task_spec.metrics().to(self.device)
        return self.domain_metrics[dataloader_idx]

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """One validation batch; loader 0 logs `val/loss` and `val/<metric>`, evaluation domain D (loader 1, 2, ...)
        `val/loss/D` and `val/<metric>/D`."""
        inputs, targets = self.task_spec.split(batch)
        output = self(inputs)
        if self.task_spec.has_loss:
            domain = self._domain_name(dataloader_idx)
            self.log(domain_key("val/loss", domain), self.task_loss(output, targets, inputs), on_epoch=True,
                     sync_dist=True, batch_size=self.task_spec.size(inputs), add_dataloader_idx=False)
        self.task_spec.update(self._metrics_of(dataloader_idx), output, targets, inputs)

    def _domain_name(self, dataloader_idx: int) -> str:
        if dataloader_idx == 0:
            return ""
        names = self._validation_names()
        return names[dataloader_idx] if dataloader_idx < len(names) else f"dataloader_{dataloader_idx}"

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()
        for index, metrics in sorted(self.domain_metrics.items()):
            domain = self._domain_name(index)
            self.log_dict({domain_key(f"val/{k}", domain): v for k, v in metrics.compute().items()})
            metrics.reset()

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Task metrics and mean loss over `batches`, in eval mode, outside the Trainer.

        Computed from `batches` alone on this process (no cross-rank sync): under DDP every
        rank evaluates the same batches, and rank 0 may evaluate alone (the exported model)."""
        was_training = self.training
        self.eval()
        metrics = self.task_spec.metrics(sync=False).to(self.device)
        total, count = 0.0, 0
        for batch in batches:
            inputs, targets = self.task_spec.split(move_batch(batch, self.device))
            output = self(inputs)
            if self.task_spec.has_loss:
                size = self.task_spec.size(inputs)
                total += float(self.task_loss(output, targets, inputs)) * size
                count += size
            self.task_spec.update(metrics, output, targets, inputs)
        self.train(was_training)
        result = {k: float(v) for k, v in metrics.compute().items()}
        if count:
            result["loss"] = total / count
        return result

    def evaluate_loaders(self, loaders: dict[str, Iterable]) -> dict[str, float]:
        """`evaluate` on each named loader (`qat.data.loading.validation_loaders`), in one flat dict: the
        figures of loader '' under their own names, those of domain D as `<metric>/D` (`ppl/legal`)."""
        result: dict[str, float] = {}
        for domain, batches in loaders.items():
            result.update({domain_key(k, domain): v for k, v in self.evaluate(batches).items()})
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
        if cfg.schedule == "constant" and not cfg.lr_warmup_steps:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = partial(lr_factor, warmup=cfg.lr_warmup_steps, total=total, cosine=cfg.schedule == "cosine",
                         floor=cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
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
