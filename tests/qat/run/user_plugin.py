"""A user's own model and data module, plugged into a recipe by import path (no qat edits)."""

from __future__ import annotations

from torch import Tensor, nn

from qat.data.digits import DigitsDataModule


class UserMLP(nn.Module):
    """An MLP on flattened 8x8 digits."""

    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, 8, 8) -> (B, classes)
        return self.net(x)


class UserDigits(DigitsDataModule):
    """The user's data module: digits with a different validation split."""

    def __init__(self, batch_size: int = 32):
        super().__init__(batch_size=batch_size, val_fraction=0.25, split_seed=1)
