"""Synthetic token sequences from a fixed random bigram table: a tiny language-modelling task.

Example:
    >>> dm = SyntheticTokensDataModule(vocab_size=64, seq_len=32)
    >>> dm.setup("fit"); tokens, targets = next(iter(dm.train_dataloader()))   # (B, T) each
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat.data.loading import ResumableLoader


class SyntheticTokensDataModule(pl.LightningDataModule):
    """Token sequences from a fixed random bigram table: a tiny language-modelling task.

    Batches are (tokens, targets) of shape (B, T), targets being tokens shifted by one.
    """

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, train_size: int = 512, val_size: int = 128,
                 batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.sizes = (train_size, val_size)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _sequences(self, count: int, gen: torch.Generator) -> TensorDataset:
        table = torch.randint(0, self.vocab_size, (self.vocab_size, 2), generator=torch.Generator().manual_seed(7))
        tokens = torch.empty(count, self.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (count,), generator=gen)
        for t in range(self.seq_len):
            choice = torch.randint(0, 2, (count,), generator=gen)
            tokens[:, t + 1] = table[tokens[:, t], choice]
        return TensorDataset(tokens[:, :-1], tokens[:, 1:])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.train_set = self._sequences(self.sizes[0], gen)
            self.val_set = self._sequences(self.sizes[1], gen)

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, generator=torch.Generator())
