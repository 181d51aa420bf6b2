"""Quantization schedule callback: FP warm-up, calibration, fake-quant on, freezing.

At `warmup_steps` (counted in optimizer steps) it measures the float model, runs
`calibration_batches` training batches through the model to initialize observers and
scales (weights re-initialized from their warmed-up values; with `weight_rounding: gptq`
the Linear weights are then GPTQ-rounded on the same batches), switches fake-quant on and
measures again: the float (FP) and post-training-quantization (PTQ) figures (with GPTQ, also the
round-to-nearest model before it, so the table shows what GPTQ adds). Later it
turns on activations, freezes scales and observers, and freezes BatchNorm statistics at
the configured steps. Its state is in every checkpoint, so a resumed run picks up
exactly where it stopped.

Example:
    >>> QuantizationSchedule(ScheduleConfig(warmup_steps=200, calibration_batches=8, freeze_step=900))
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from qat.control import calibrate, freeze, quantizers, set_fake_quant
from qat.data.loading import calibration_loader, validation_loaders
from qat.ptq import gptq_round
from qat.recipe import ScheduleConfig
from qat.tasks import move_batch


def broadcast_quantizer_state(model: nn.Module) -> None:
    """Give every rank rank 0's scales, zero points and observer ranges (DDP calibration)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for _, quantizer in quantizers(model):
        for tensor in (quantizer.scale, quantizer.zero_point, quantizer.observer.lo, quantizer.observer.hi):
            if not hasattr(tensor, "device_mesh"):  # sharded (FSDP2) qparams already hold rank 0's values
                dist.broadcast(tensor.data, src=0)


def broadcast_weights(model: nn.Module, names: list[str]) -> None:
    """Give every rank rank 0's weights of the layers `names` (GPTQ changes weights by each rank's batches)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    modules = dict(model.named_modules())
    for name in names:
        dist.broadcast(modules[name].weight.data, src=0)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers in eval mode: running statistics stop updating."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class QuantizationSchedule(pl.Callback):
    """Drives a prepared model through warm-up -> calibration -> QAT -> frozen."""

    def __init__(self, config: ScheduleConfig, evaluate: bool = True) -> None:
        self.config = config
        self.evaluate = evaluate
        self.quantized = False
        self.activations_on = False
        self.frozen = False
        self.bn_frozen = False
        self.fp_metrics: dict[str, float] = {}
        self.ptq_metrics: dict[str, float] = {}
        self.rtn_metrics: dict[str, float] = {}  # with GPTQ rounding: the model before it, round-to-nearest

    def model_setup(self, model: nn.Module) -> None:
        """Before fit on a fresh run: fake-quant off for the float warm-up."""
        set_fake_quant(model, weights=False, activations=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        step, cfg, model = trainer.global_step, self.config, pl_module.model
        if not self.quantized and step >= cfg.warmup_steps:
            self._quantize(trainer, pl_module)
        if self.quantized and not self.activations_on and step >= (cfg.activation_start_step or 0):
            set_fake_quant(model, activations=True)
            self.activations_on = True
        if not self.frozen and cfg.freeze_step is not None and step >= cfg.freeze_step:
            freeze(model)
            self.frozen = True
        if cfg.freeze_bn_step is not None and step >= cfg.freeze_bn_step:
            freeze_batchnorm(model)
            self.bn_frozen = True

    def _quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        val_batches = self._val_batches(trainer)
        if self.evaluate and val_batches is not None:
            self.fp_metrics = pl_module.evaluate_loaders(val_batches)
        calibration_batches = self._calibration_batches(trainer, pl_module.device)
        set_fake_quant(model, weights=True, activations=True)  # calibrate every quantizer the model will use
        calibrate(model, calibration_batches)
        activations_now = (self.config.activation_start_step or 0) <= trainer.global_step
        if self.config.weight_rounding == "gptq":
            if self.evaluate and val_batches is not None:  # the round-to-nearest figures GPTQ is measured against
                set_fake_quant(model, weights=True, activations=activations_now)
                self.rtn_metrics = pl_module.evaluate_loaders(val_batches)
                set_fake_quant(model, weights=True, activations=True)  # GPTQ sees what calibration saw
            rounded = gptq_round(model, calibration_batches, self.config.gptq_damping, self.config.gptq_act_order)
            broadcast_weights(model, list(rounded))
        broadcast_quantizer_state(model)
        set_fake_quant(model, weights=True, activations=activations_now)
        self.activations_on = activations_now
        self.quantized = True
        if self.evaluate and val_batches is not None:
            self.ptq_metrics = pl_module.evaluate_loaders(val_batches)
            self._log(trainer, {**self._prefixed("fp", self.fp_metrics), **self._prefixed("rtn", self.rtn_metrics),
                                **self._prefixed("ptq", self.ptq_metrics)})

    @staticmethod
    def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
        return {f"{prefix}/{key}": value for key, value in metrics.items()}

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:  # straight to the loggers: this happens once, not on a logging step
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _calibration_batches(self, trainer: pl.Trainer, device: torch.device) -> list:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("QuantizationSchedule needs the Trainer to be given a LightningDataModule")
        taken = itertools.islice(iter(calibration_loader(datamodule)), self.config.calibration_batches)
        return [move_batch(batch, device) for batch in taken]

    @staticmethod
    def _val_batches(trainer: pl.Trainer) -> Optional[dict[str, list]]:
        """The validation batches by loader name ('' the data module's own split, then its evaluation domains),
        so the FP / RTN / PTQ rows have a figure per domain as the QAT and int4 rows do."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        return {name: list(loader) for name, loader in validation_loaders(datamodule).items()}

    def state_dict(self) -> dict:
        keys = ("quantized", "activations_on", "frozen", "bn_frozen", "fp_metrics", "ptq_metrics", "rtn_metrics")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bn_frozen:  # Lightning puts the model back in train mode every epoch
            freeze_batchnorm(pl_module.model)
