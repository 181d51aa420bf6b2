"""Small architectures that export tests rebuild by import path ('export_test_models.Name').

conftest.py puts this folder on sys.path, so `qat.load` can import them as the
checkpoint's `_target_` says.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear (no bias on the middle layer)."""

    def __init__(self, inputs: int = 64, hidden: int = 128, outputs: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyLM(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear -> head tied to the embedding; a non-persistent buffer."""

    def __init__(self, vocab: int = 48, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("position_scale", torch.linspace(0.5, 1.5, 16), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) * self.position_scale[: ids.shape[-1], None]
        h = h + self.down(torch.relu(self.norm(self.up(h))))
        return self.head(h)


class EmbedMLP(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear: only quantizable layers (exact in bf16 too)."""

    def __init__(self, vocab: int = 40, dim: int = 32, outputs: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, outputs)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(self.embed(ids))))


class ConvNet(nn.Module):
    """Three convolutions (odd K = 27 first, grouped, reflect padding) then a Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.conv3 = nn.Conv2d(32, 32, 1, bias=False)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class NotAModel:
    """A class that is not an nn.Module (the loader must refuse to call it)."""

    def __init__(self, **kwargs: object) -> None:
        raise AssertionError("the loader called a non-Module class")
