"""A small CNN for scikit-learn's 8x8 digits: the default recipe's model.

Example:
    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convs with BatchNorm, a pool, two linear layers."""

    def __init__(self, channels: int = 32, hidden: int = 128, classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels * 2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2C, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * 2 * 16, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, 8, 8) -> (B, classes)
        return self.classifier(self.features(x))
