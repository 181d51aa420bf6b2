"""A callback that tells `ResumableLoader`s how far the trainer got, so a resumed run skips what it saw."""

from __future__ import annotations

import pytorch_lightning as pl

from qat.data.loading import ResumableLoader


class LoaderProgress(pl.Callback):
    """Wires the trainer's progress (batches trained this epoch, epoch complete) into `ResumableLoader`s."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loops = trainer.fit_loop
        # Lightning restores loader states in `setup_data`, which returns early when the loader was
        # already made to estimate the number of steps (the cosine schedule asks for it before the
        # checkpoint is restored), so the saved position would be lost. Restore it here instead,
        # whenever a checkpoint left states waiting: Lightning's own `_load_combined_loader_states`
        # also requires `restarting`, which it leaves False when resuming from a checkpoint written at
        # the end of an epoch (a run that ended by max_epochs), so the next epoch would reuse epoch 0's order.
        waiting = loops._combined_loader_states_to_load
        if waiting and loops._combined_loader is not None:
            loops._combined_loader._load_state_dicts(waiting)
            loops._combined_loader_states_to_load = []

        def progress() -> tuple[int, bool]:
            done = loops.epoch_loop.batch_progress.current.processed
            return done, done >= trainer.num_training_batches

        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if isinstance(loader, ResumableLoader):
                loader.progress = progress
