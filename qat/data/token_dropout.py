"""Token dropout for sentence-encoder training: each epoch sees every training sentence with other inner
tokens left out, so a student distilled on a few thousand sentences meets new inputs from the same text
at every epoch (the teacher embeds the same shortened input, so the target stays consistent).

Example:
    >>> dropped = TokenDropout(train_set, probability=0.1, seed=0)
    >>> loader = ResumableLoader(dropped, batch_size=32, shuffle=True); dropped.sampler = loader.epoch_sampler
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from qat.data.loading import EpochSampler


class TokenDropout(Dataset):
    """`source`'s items with each inner token (not the first or the last: [CLS] / [SEP]) dropped with
    `probability`, at least one inner token kept. The draw is seeded by (seed, epoch, index), the epoch
    read from `sampler` (the training loader's; epoch 0 without one), so a resumed run drops the same tokens.
    """

    def __init__(self, source: Dataset, probability: float, seed: int = 0,
                 sampler: Optional[EpochSampler] = None) -> None:
        if not 0.0 <= probability < 1.0:
            raise ValueError(f"token dropout probability={probability!r} must be in [0, 1)")
        self.source, self.probability, self.seed, self.sampler = source, probability, seed, sampler

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.source[index]
        length = sample["input_ids"].numel()
        if self.probability == 0.0 or length <= 3:
            return sample
        epoch = max(self.sampler.epoch, 0) if self.sampler is not None else 0
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        keep = torch.rand(length, generator=generator) >= self.probability  # (L,)
        keep[0] = keep[-1] = True
        if not keep[1:-1].any():
            keep[1] = True
        return {key: value[keep] for key, value in sample.items()}
