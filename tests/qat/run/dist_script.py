"""Subprocess entry for the 2-process (gloo, CPU) fault and sharding tests on TinyLM:
`python -m tests.qat.run.dist_script RUN_DIR MODE [ARG] [key=value ...]`.

Modes (every mode trains recipes/tinylm_w4.yaml shrunk to TINY, on 2 ranks unless said):
    full           train to the end; rank 0 saves the final model state
    kill STEP      rank 1 SIGKILLs itself right after optimizer step STEP
    resume         resume=last and train to the end; rank 0 saves the final model state
    nan STEP       rank 1's loss is NaN at optimizer step STEP (the other rank's is finite)
    hang STEP      rank 1 stops answering (sleeps) right after optimizer step STEP
Extra `key=value` arguments are recipe overrides (trainer.strategy=..., trainer.devices=1).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

import qat.run.train
from qat.run.train import train
from tests.qat.run.helpers import ROOT, fast_recipe

TINYLM = ROOT / "recipes" / "tinylm_w4.yaml"
# 16 batches of 16 per epoch, 8 per rank: 12 steps cross an epoch boundary; a checkpoint every step.
TINY = ["trainer.max_steps=12", "trainer.checkpoint_every_n_steps=1",
        "schedule.warmup_steps=4", "schedule.calibration_batches=2", "data.args.batch_size=16",
        "trainer.strategy=ddp", "trainer.devices=2", "logging.wandb=disabled", "trainer.limit_val_batches=2"]


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


class KillRankAt(pl.Callback):
    """SIGKILLs rank `victim` right after optimizer step `step` (before that step's checkpoint)."""

    def __init__(self, step: int, victim: int = 1):
        self.step, self.victim = step, victim

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)


class HangRankAt(KillRankAt):
    """Rank `victim` stops answering after optimizer step `step`, its connections left open."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.victim:
            time.sleep(3600)


class NaNLossOnRankAt(pl.Callback):
    """Makes rank `victim`'s loss NaN at optimizer step `step`: its task loss is scaled by NaN."""

    def __init__(self, step: int, victim: int = 1):
        self.step, self.victim = step, victim

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.victim:
            pl_module.task_loss_weight = float("nan")


_RUN = {}


def _keep_run(original):
    def build_and_keep(*args, **kwargs):
        _RUN["run"] = original(*args, **kwargs)
        return _RUN["run"]

    return build_and_keep


def main() -> None:
    run_dir, mode, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    arg = int(rest.pop(0)) if mode in ("kill", "hang", "nan") else None
    make = {"kill": KillRankAt, "hang": HangRankAt, "nan": NaNLossOnRankAt}
    callbacks = [make[mode](arg)] if mode in make else []
    extra = ["resume=last"] if mode == "resume" else []
    recipe = fast_recipe(run_dir, *TINY, *extra, *rest, path=TINYLM)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"pid_rank{rank()}").write_text(str(os.getpid()))
    qat.run.train.build = _keep_run(qat.run.train.build)
    train(recipe, extra_callbacks=callbacks, quiet=True)
    if rank() == 0 and recipe.trainer.strategy != "fsdp2":  # a sharded run's state: its gathered last.ckpt
        model = _RUN["run"].model
        torch.save(model.state_dict(), run_dir / "final_state.pt")


if __name__ == "__main__":
    main()
