"""scikit-learn's 1,797 8x8 digits (shipped with it, no download) as a resumable data module.

Example:
    >>> dm = DigitsDataModule(batch_size=64)
    >>> dm.setup("fit"); x, y = next(iter(dm.train_dataloader()))   # x: (64, 1, 8, 8)
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat.data.loading import ResumableLoader


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 8x8 handwritten digits shipped inside scikit-learn, scaled to [0, 1].

    A fixed stratified split (`val_fraction`, `split_seed`) gives train and validation sets.
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, split_seed: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.val_fraction, self.split_seed, self.seed = batch_size, val_fraction, split_seed, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the digits data needs scikit-learn: pip install 'qat[examples]'") from err
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = self._stratified_split(labels)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def _stratified_split(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.split_seed)
        train, val = [], []
        for cls in labels.unique():
            idx = (labels == cls).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = round(len(idx) * self.val_fraction)
            val.append(idx[:n_val])
            train.append(idx[n_val:])
        return torch.cat(train).sort().values, torch.cat(val).sort().values

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, generator=torch.Generator())
