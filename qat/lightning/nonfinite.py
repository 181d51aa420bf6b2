"""Non-finite guard: a NaN/inf loss stops the run with a clear message and a diagnostic checkpoint.

The check runs before backward, so the checkpoint holds the weights that produced the
bad loss, not weights already damaged by its gradients.

Under a distributed strategy every rank decides together: each rank's verdict is
all-reduced (any rank with a non-finite loss stops them all), then every rank calls
`trainer.save_checkpoint` (a collective in Lightning: it ends on a barrier) and every
rank raises. A guard that saved and stopped on the bad rank alone would leave that rank
waiting on the checkpoint barrier while the others wait on the gradient all-reduce.

Example:
    >>> pl.Trainer(callbacks=[NonFiniteGuard(diagnostics_dir="runs/x/checkpoints")])
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (on this rank or another)."""


def ranks_with_nonfinite_loss(trainer: pl.Trainer, loss: Tensor) -> list[int]:
    """The ranks whose loss is not finite, the same list on every rank (a collective)."""
    flag = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=loss.device)
    if trainer.world_size == 1:
        return [0] if flag.item() else []
    flags = trainer.strategy.all_gather(flag).reshape(-1)  # (world_size,)
    return [rank for rank, bad in enumerate(flags.tolist()) if bad]


class NonFiniteGuard(pl.Callback):
    """Stops training on the first non-finite loss, saving `nonfinite-step<N>.ckpt` first."""

    def __init__(self, diagnostics_dir: str | Path) -> None:
        self.diagnostics_dir = Path(diagnostics_dir)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad_ranks = ranks_with_nonfinite_loss(trainer, loss)
        if not bad_ranks:
            return
        step = trainer.global_step
        path = self.diagnostics_dir / f"nonfinite-step{step}.ckpt"
        if trainer.is_global_zero:
            self.diagnostics_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)  # on every rank: Lightning's save is collective
        bad = [name for name, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        detail = f"; non-finite parameters: {', '.join(bad[:10])}" if bad else "; all parameters are finite"
        where = f" on rank(s) {bad_ranks}" if trainer.world_size > 1 else ""
        value = float(loss.detach()) if trainer.global_rank in bad_ranks else "non-finite"
        raise NonFiniteLossError(
            f"loss became {value}{where} at step {step} (batch {trainer.fit_loop.epoch_loop.batch_idx})"
            f"{detail}. Diagnostic checkpoint: {path}. Try a lower "
            "learning rate or quantizer_lr, more calibration batches, or gradient clipping "
            "(trainer.gradient_clip_val)."
        )
