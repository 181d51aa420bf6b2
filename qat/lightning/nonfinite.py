"""Non-finite guard: a NaN/inf loss stops the run with a clear message and a diagnostic checkpoint.

The check runs before backward, so the checkpoint holds the weights that produced the
bad loss, not weights already damaged by its gradients.

Example:
    >>> pl.Trainer(callbacks=[NonFiniteGuard(diagnostics_dir="runs/x/checkpoints")])
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NonFiniteGuard(pl.Callback):
    """Stops training on the first non-finite loss, saving `nonfinite-step<N>.ckpt` first."""

    def __init__(self, diagnostics_dir: str | Path) -> None:
        self.diagnostics_dir = Path(diagnostics_dir)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if torch.isfinite(loss).all():
            return
        step = trainer.global_step
        path = self.diagnostics_dir / f"nonfinite-step{step}.ckpt"
        self.diagnostics_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
        bad = [name for name, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        detail = f"; non-finite parameters: {', '.join(bad[:10])}" if bad else "; all parameters are finite"
        raise NonFiniteLossError(
            f"loss became {float(loss.detach())} at step {step} (batch {trainer.fit_loop.epoch_loop.batch_idx}) "
            f"{detail}. Diagnostic checkpoint: {path}. Try a lower learning rate or quantizer_lr, "
            "more calibration batches, or gradient clipping (trainer.gradient_clip_val)."
        )
