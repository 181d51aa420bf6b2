"""A DataLoader that resumes mid-epoch: the data order is a function of (seed, epoch).

Lightning saves the state of stateful loaders in its checkpoints and restores it on
resume; this loader's state is the epoch and the number of batches already trained,
so a killed run continues with exactly the batches it had not seen. Under DDP each
rank takes every world_size-th index of the shared permutation (Lightning's sampler
replacement must be off: `use_distributed_sampler=False`, as `qat.build` sets).

Example:
    >>> loader = ResumableLoader(dataset, batch_size=64, shuffle=True, seed=0)
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), this rank's share, from `start`."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0
        self.start = 0  # index (within this rank's share) to begin the next iteration at

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        rank, world = _rank_and_world()
        usable = len(order) - len(order) % world  # every rank gets the same number of samples
        return order[rank:usable:world]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()[self.start :]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices())


class ResumableLoader(DataLoader):
    """DataLoader with `state_dict` / `load_state_dict` for exact mid-epoch resume.

    `progress` returns how many batches of the current epoch have been trained; the
    trainer's progress is wired in by `qat.build` (the loader cannot count them itself,
    because Lightning fetches one batch ahead).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, **kwargs: Any):
        self.epoch_sampler = EpochSampler(len(dataset), shuffle, seed)
        # An own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run (which creates one more iterator) would see different dropout masks.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kwargs)
        self.progress: Optional[Callable[[], tuple[int, int]]] = None
        self._resume_epoch: Optional[int] = None

    def __iter__(self) -> Iterator:
        epoch = self._current_epoch()
        if self._resume_epoch is not None and self._resume_epoch != epoch:
            self.epoch_sampler.start = 0  # the saved position belonged to an epoch already over
        self._resume_epoch = None
        self.epoch_sampler.epoch = epoch
        return super().__iter__()

    def _current_epoch(self) -> int:
        return self.progress()[0] if self.progress is not None else self.epoch_sampler.epoch

    def state_dict(self) -> dict:
        epoch, batches = self.progress() if self.progress is not None else (self.epoch_sampler.epoch, 0)
        return {"epoch": epoch, "batches_done": batches}

    def load_state_dict(self, state: dict) -> None:
        self._resume_epoch = int(state["epoch"])
        self.epoch_sampler.epoch = self._resume_epoch
        self.epoch_sampler.start = int(state["batches_done"]) * int(self.batch_size or 1)


class LoaderProgress(pl.Callback):
    """Wires the trainer's progress (epoch, batches trained this epoch) into `ResumableLoader`s."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loops = trainer.fit_loop
        # Lightning restores loader states in `setup_data`, which returns early when the loader was
        # already made to estimate the number of steps (the cosine schedule asks for it before the
        # checkpoint is restored), so the saved position would be lost. Restore it here instead;
        # the call is a no-op unless a restart has states waiting.
        loops._load_combined_loader_states()

        def progress() -> tuple[int, int]:
            return trainer.current_epoch, loops.epoch_loop.batch_progress.current.processed

        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if isinstance(loader, ResumableLoader):
                loader.progress = progress
