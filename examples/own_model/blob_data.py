"""The data module of the "your own model" example: Gaussian blobs, made in memory (no download).

`data._target_: blob_data.BlobDataModule` plugs it in. What qat relies on:

* batches are `(x, y)`: inputs and integer class labels in 0..num_classes-1;
* `num_classes` (an attribute) is the class count the accuracy and calibration metrics use;
* `setup` may be called more than once (qat runs one validation batch through the model before the
  run directory is made, then Lightning sets the data up again), so it builds the data once;
* the training loader is a `qat.data.loading.ResumableLoader`, so that `resume=last` continues with the
  batches a killed run had not seen (a plain DataLoader trains too, but resumes at an epoch's start).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat.data.loading import ResumableLoader


class BlobDataModule(pl.LightningDataModule):
    """`samples` points in `features` dimensions around `num_classes` random centres; the last fifth
    is the validation set."""

    def __init__(self, features: int = 16, num_classes: int = 4, samples: int = 2000, spread: float = 0.5,
                 batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.features, self.num_classes, self.samples, self.spread = features, num_classes, samples, spread
        self.batch_size, self.seed = batch_size, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)  # its own generator: the same data whatever ran before
        centres = torch.randn(self.num_classes, self.features, generator=gen) * self.spread
        labels = torch.randint(self.num_classes, (self.samples,), generator=gen)
        points = centres[labels] + torch.randn(self.samples, self.features, generator=gen)
        cut = self.samples * 4 // 5
        self.train_set = TensorDataset(points[:cut], labels[:cut])
        self.val_set = TensorDataset(points[cut:], labels[cut:])

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)
