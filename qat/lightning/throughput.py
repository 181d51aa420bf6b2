"""Throughput callback: tokens (or samples) per second of training, on the progress bar and in the logs.

Counted from the batches themselves (unmasked tokens of dict batches), over the wall time
between the starts of consecutive training batches, smoothed over the last `window` batches.

Example:
    >>> pl.Trainer(callbacks=[Throughput(make_task("causal_lm"))])
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pytorch_lightning as pl

from qat.tasks import Task


class Throughput(pl.Callback):
    """Logs `train/tokens_per_s` (shown on the progress bar) every training batch."""

    def __init__(self, task: Task, window: int = 20) -> None:
        self.task = task
        self.samples: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        inputs, _ = self.task.split(batch)
        self.samples.append((time.perf_counter(), self.task.tokens(inputs)))
        if len(self.samples) >= 2:
            elapsed = self.samples[-1][0] - self.samples[0][0]
            tokens = sum(count for _, count in list(self.samples)[:-1])  # batches that have finished
            pl_module.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=1)
