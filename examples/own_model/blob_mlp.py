"""The model of the "your own model" example: an MLP, plugged in by `model._target_: blob_mlp.BlobMLP`.

Nothing here knows about qat: `qat.prepare` swaps its Linear layers for quantized ones. The classification
contract is the whole interface: `forward` takes the batch's input tensor (B, features) and returns
(B, classes) logits; qat computes the loss (cross entropy) and the metrics itself.
"""

from __future__ import annotations

from torch import Tensor, nn


class BlobMLP(nn.Module):
    """features -> hidden -> hidden -> classes, ReLU between."""

    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, features) -> (B, classes) logits
        return self.net(x)
