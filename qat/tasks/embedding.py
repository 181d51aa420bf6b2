"""The sentence-embedding task: encoders distilled from, and measured against, the float model.

    embedding        dicts {input_ids, attention_mask, ...}; the sentence embedding: mean of
                     last_hidden_state over unmasked tokens, L2-normalized (sentence-transformers'
                     pooling); no task loss (distill from the float model); cosine to the float
                     model's embeddings and top-1 nearest-neighbour agreement

With evaluation domains (`SentenceDataModule(eval_corpora=...)`) each validation loader gets its own
metrics (`QATModule.validation_step` by dataloader index): `val/cosine/<domain>` and
`val/nn_agreement/<domain>`, and `cosine/<domain>` in every summary row; the nearest neighbours are
searched within each domain's sentences.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from qat.config import ConfigError
from qat.distill.embedding import mean_pool
from qat.tasks.classification import Task, model_output


class EmbeddingTask(Task):
    """Sentence embeddings of an encoder, measured against the float model (`reference`)."""

    name = "embedding"
    has_loss = False

    def split(self, batch: dict) -> tuple[dict, None]:
        return batch, None

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        output = model_output(model, inputs)
        hidden = output if isinstance(output, Tensor) else output.last_hidden_state
        mask = inputs.get("attention_mask")
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask
        return F.normalize(mean_pool(hidden, mask), dim=-1)  # (B, H)

    def loss(self, output: Tensor, targets: Any, inputs: Any) -> Tensor:
        raise ConfigError("task 'embedding' has no task loss: distill from the float model "
                          "(distill.enabled=true, distill.task_weight=0)")

    def metrics(self, sync: bool = True) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"cosine": EmbeddingAgreement("cosine"),
                                              "nn_agreement": EmbeddingAgreement("nn_agreement")})

    @torch.no_grad()
    def update(self, metrics: torchmetrics.MetricCollection, output: Tensor, targets: Any, inputs: Any) -> None:
        if self.reference is None:
            raise RuntimeError("task 'embedding' is measured against the float model: set task.reference")
        reference = self.forward(self.reference, inputs)
        metrics.update(output.float(), reference)


class EmbeddingAgreement(torchmetrics.Metric):
    """'cosine': mean cosine similarity of embeddings to the reference ones; 'nn_agreement': the share of
    samples whose nearest other sample (by cosine) is the same under both embeddings."""

    full_state_update = False

    def __init__(self, which: str) -> None:
        super().__init__(sync_on_compute=False)
        self.which = which
        self.add_state("student", default=[], dist_reduce_fx="cat")
        self.add_state("reference", default=[], dist_reduce_fx="cat")

    def update(self, student: Tensor, reference: Tensor) -> None:
        self.student.append(F.normalize(student.float(), dim=-1))
        self.reference.append(F.normalize(reference.float(), dim=-1))

    def compute(self) -> Tensor:
        student, reference = torch.cat(self.student), torch.cat(self.reference)  # (N, H) each
        if self.which == "cosine":
            return (student * reference).sum(-1).mean()
        return (nearest_neighbours(student) == nearest_neighbours(reference)).float().mean()


def nearest_neighbours(embeddings: Tensor) -> Tensor:
    """(N, H) unit vectors -> (N,) index of each one's most similar other vector."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.argmax(dim=-1)
