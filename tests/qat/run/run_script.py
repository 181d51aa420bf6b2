"""Subprocess entry for the resume and DDP tests: `python -m tests.qat.run.run_script RUN_DIR MODE ...`.

Modes:
    full           train to the end, save the final model state
    kill STEP      train and SIGKILL this process right after optimizer step STEP
    resume         resume=last, train to the end, save the final model state
    ddp            2-process DDP on CPU (gloo); every rank saves its quantizer state
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from qat.control import quantizers
from qat.run.train import train
from tests.qat.run.helpers import fast_recipe

# 12 batches per epoch: 30 steps cross two epoch boundaries; checkpoints every step.
RESUME = ["trainer.max_steps=30", "trainer.checkpoint_every_n_steps=1", "schedule.warmup_steps=8",
          "schedule.freeze_step=24", "logging.telemetry_every_n_steps=7"]


class KillAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "ddp":
        recipe = fast_recipe(run_dir, "trainer.max_steps=12", "schedule.warmup_steps=4", "trainer.strategy=ddp",
                             "trainer.devices=2", "quant.activation={bits: 8, symmetric: false, granularity: tensor, "
                             "quantizer: lsq_plus, init: minmax, scale_dtype: float32}")
        summary = train(recipe, quiet=True)
        rank = int(os.environ.get("LOCAL_RANK", 0))
        model = summary_model(summary, rank)
        torch.save({name: {"scale": q.scale.detach(), "zero": q.zero_point.detach(), "lo": q.observer.lo,
                           "hi": q.observer.hi} for name, q in quantizers(model)}, run_dir / f"rank{rank}.pt")
        return
    extra = ["resume=last"] if mode == "resume" else []
    callbacks = [KillAt(int(sys.argv[3]))] if mode == "kill" else []
    recipe = fast_recipe(run_dir, *RESUME, *extra)
    train(recipe, extra_callbacks=callbacks, quiet=True)
    model = summary_model(None, 0)
    torch.save(model.state_dict(), run_dir / "final_state.pt")


_MODEL = {}


def summary_model(summary, rank):
    return _MODEL["model"]


if __name__ == "__main__":
    import qat.run.train

    original_build = qat.run.train.build

    def build_and_keep(*args, **kwargs):
        run = original_build(*args, **kwargs)
        _MODEL["model"] = run.model
        return run

    qat.run.train.build = build_and_keep
    main()
