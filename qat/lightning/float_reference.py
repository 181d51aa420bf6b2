"""Keep the float model of a run: `<run_dir>/float.safetensors`, written at the end of FP warm-up.

`qat eval` compares every quantized stage against this file (the float reference). It is
the prepared model with its quantizers and pruning masks dropped, at the step fake-quant
goes on (calibration changes no weight and no BatchNorm statistic, so it is the float
model as warm-up left it). Written once, by rank 0; a resumed run keeps the file it has.

Example:
    >>> trainer = pl.Trainer(default_root_dir=run_dir, callbacks=[schedule, FloatReference(warmup_steps=230)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import safetensors.torch

from qat.lightning.distillation import float_copy

FLOAT_FILE = "float.safetensors"


class FloatReference(pl.Callback):
    """Writes the float model to `run_dir/float.safetensors` once, at step `warmup_steps`
    (`run_dir`: the trainer's `default_root_dir` when None)."""

    def __init__(self, warmup_steps: int, run_dir: Optional[str | Path] = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.warmup_steps = warmup_steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        path = (self.run_dir or Path(trainer.default_root_dir)) / FLOAT_FILE
        if trainer.global_step < self.warmup_steps or path.is_file() or not trainer.is_global_zero:
            return

        state = float_copy(pl_module.model).state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(separate_tied(state), str(path))


def separate_tied(state: dict) -> dict:
    """The state as CPU tensors, a tied table (one tensor under two names) copied for its second name:
    safetensors refuses tensors that share memory, and loading both names back restores the tie."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.data_ptr()
        out[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out
