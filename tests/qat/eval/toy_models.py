"""Toy models for the evaluation tests (importable by recipes as tests.qat.eval.toy_models.*)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

FRAGILE_RECIPE = Path(__file__).with_name("fragile.yaml")


class FragileMLP(nn.Module):
    """Two 32x32 layers: fc1 with ordinary weights; fc2 with the same large weight on input 0 in every
    row (a common term that cancels in the softmax) over small weights that decide the class. At 2 bits
    the outlier sets fc2's scales, its small weights round to 0 and its outputs collapse: fragile."""

    def __init__(self, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(width, width, generator=generator) / width**0.5)
            self.fc2.weight.copy_(torch.randn(width, width, generator=generator) / width**0.5)
            self.fc2.weight[:, 0] = 20.0

    def forward(self, x: Tensor) -> Tensor:  # (B, width) -> (B, width)
        return self.fc2(torch.relu(self.fc1(x)))
