"""A DataLoader that resumes mid-epoch: the data order is a function of (seed, epoch).

Lightning saves the state of stateful loaders in its checkpoints and restores it on
resume; this loader's state is the epoch and the number of batches already trained,
so a killed run continues with exactly the batches it had not seen. Under DDP each
rank takes every world_size-th index of the shared permutation (Lightning's sampler
replacement must be off: `use_distributed_sampler=False`, as `qat.run.build` sets).

Example:
    >>> loader = ResumableLoader(dataset, batch_size=64, shuffle=True, seed=0)
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), this rank's share.

    Each new iteration is the next epoch; `resume_at(epoch, start)` makes the next one
    epoch `epoch` from index `start` of this rank's share. The epoch is chosen when the
    first index is drawn (the body of `__iter__` is a generator), so an iterator that
    Lightning creates and never uses takes no epoch.
    """

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = -1  # the epoch of the iteration in progress (or last run)
        self._resume: Optional[tuple[int, int]] = None

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        rank, world = _rank_and_world()
        usable = len(order) - len(order) % world  # every rank gets the same number of samples
        return order[rank:usable:world]

    def resume_at(self, epoch: int, start: int) -> None:
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self._resume if self._resume is not None else (self.epoch + 1, 0)
        self._resume = None
        self.epoch = epoch
        yield from self.indices(epoch)[start:]

    def __len__(self) -> int:
        world = _rank_and_world()[1]
        return self.size // world  # the length of every rank's share, without drawing a permutation


# (batches of the current epoch already trained, whether the epoch is complete)
Progress = Callable[[], tuple[int, bool]]


class ResumableLoader(DataLoader):
    """DataLoader with `state_dict` / `load_state_dict` for exact mid-epoch resume.

    `progress` reports how many batches of the current epoch have been trained and whether
    the epoch is complete; `LoaderProgress` wires the trainer's counters in (the loader
    cannot count them itself, because Lightning fetches one batch ahead).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, **kwargs: Any):
        self.epoch_sampler = EpochSampler(len(dataset), shuffle, seed)
        # An own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run (which creates one more iterator) would see different dropout masks.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kwargs)
        self.progress: Optional[Progress] = None

    def state_dict(self) -> dict:
        done, complete = self.progress() if self.progress is not None else (0, False)
        return {"epoch": self.epoch_sampler.epoch, "batches_done": done, "epoch_complete": complete}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if state.get("epoch_complete", False):
            self.epoch_sampler.resume_at(epoch + 1, 0)
        else:
            self.epoch_sampler.resume_at(epoch, done * int(self.batch_size or 1))


def validation_names(datamodule: Any) -> list[str]:
    """The names of a data module's validation loaders, in `val_dataloader()` order: '' for its own held-out
    split, then its `eval_domains` (a `TextDataModule` with `eval_corpora`)."""
    return ["", *(getattr(datamodule, "eval_domains", None) or ())]


def validation_loaders(datamodule: Any) -> dict[str, Any]:
    """A data module's validation loaders by name ('' first: its own held-out split; then one per evaluation
    domain), whether `val_dataloader()` gives one loader or a list."""
    loaders = datamodule.val_dataloader()
    if not isinstance(loaders, (list, tuple)):
        return {"": loaders}
    names = validation_names(datamodule)
    if len(names) != len(loaders):
        names = ["", *(f"dataloader_{i}" for i in range(1, len(loaders)))]
    return dict(zip(names, loaders, strict=True))


def main_validation_loader(datamodule: Any) -> Any:
    """The data module's own validation loader (the first, when `val_dataloader()` gives several)."""
    return validation_loaders(datamodule)[""]


def report_loader(datamodule: Any) -> tuple[str, Any]:
    """(split name, loader) the evaluation report measures on: the data module's `test_dataloader()` when
    it has one (a data set with an official test split, e.g. Fashion-MNIST's 10,000 images), else its own
    validation split."""
    if _defines_test_loader(datamodule):
        datamodule.setup("test")
        return "test", datamodule.test_dataloader()
    return "validation", main_validation_loader(datamodule)


def _defines_test_loader(datamodule: Any) -> bool:
    """Whether the data module has a test split: its own `test_dataloader` (LightningDataModule's default one
    raises that none is implemented)."""
    import pytorch_lightning as pl

    method = getattr(type(datamodule), "test_dataloader", None)
    return callable(method) and method is not getattr(pl.LightningDataModule, "test_dataloader", None)


def calibration_loader(datamodule: Any) -> Any:
    """The loader whose first batches calibrate (and GPTQ-round) the model: the data module's
    `calibration_dataloader()` when it has one (e.g. `GeneratedTextDataModule(calibration_source='user')`),
    else its training loader."""
    method = getattr(datamodule, "calibration_dataloader", None)
    return method() if callable(method) else datamodule.train_dataloader()


def domain_key(metric: str, domain: str) -> str:
    """The name of `metric` measured on validation loader `domain`: `metric` itself for the data module's own
    split (''), else `metric/domain` (summary rows: `ppl/legal`; logged: `val/ppl/legal`)."""
    return f"{metric}/{domain}" if domain else metric
