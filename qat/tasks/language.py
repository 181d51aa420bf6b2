"""Language-model tasks: perplexity over (B, T, V) logits.

    language_model   (tokens, targets) tuples, targets already shifted; (B, T, V) logits; perplexity
    causal_lm        dicts {input_ids, attention_mask, labels}; model(**inputs).logits; next-token
                     loss with the shift inside, padding (mask 0 or label -100) ignored; perplexity
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from qat.tasks.classification import IGNORE, Task


def shifted_targets(inputs: dict, labels: Optional[Tensor]) -> Tensor:
    """Next-token targets (B, T-1): labels (or input_ids) shifted by one, IGNORE where padded."""
    labels = inputs["input_ids"] if labels is None else labels
    targets = labels[:, 1:].clone()
    mask = inputs.get("attention_mask")
    if mask is not None:
        targets[mask[:, 1:] == 0] = IGNORE
    return targets


class LanguageModelTask(Task):
    """(tokens, targets) tuples with targets already shifted; perplexity."""

    name = "language_model"

    def metrics(self, sync: bool = True) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"ppl": torchmetrics.text.Perplexity(sync_on_compute=sync)})

    def update(self, metrics: torchmetrics.MetricCollection, output: Tensor, targets: Any, inputs: Any) -> None:
        metrics.update(output.float(), targets)


class CausalLMTask(LanguageModelTask):
    """Dict batches of a causal LM: the next-token loss over unmasked positions; perplexity."""

    name = "causal_lm"

    def split(self, batch: dict) -> tuple[dict, Tensor]:
        return batch, shifted_targets(batch, batch.get("labels"))

    def scored(self, output: Tensor) -> Tensor:
        return output[:, :-1]  # (B, T-1, V): position t predicts token t+1

    def loss(self, output: Tensor, targets: Tensor, inputs: Any) -> Tensor:
        logits = self.scored(output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE)

    def metrics(self, sync: bool = True) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"ppl": torchmetrics.text.Perplexity(ignore_index=IGNORE,
                                                                                   sync_on_compute=sync)})

    def update(self, metrics: torchmetrics.MetricCollection, output: Tensor, targets: Any, inputs: Any) -> None:
        metrics.update(self.scored(output).float(), targets)
