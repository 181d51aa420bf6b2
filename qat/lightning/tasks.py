"""Tasks: how a batch is split, fed to the model, scored and measured.

The Lightning module, calibration, distillation and evaluation all go through one `Task`,
so a recipe's model may take a tensor (the shipped toys) or keyword inputs and return an
output object (Hugging Face models):

    classification   (x, label) tuples; model(x) -> (B, C) logits; cross entropy, accuracy, ECE
    language_model   (tokens, targets) tuples, targets already shifted; (B, T, V) logits; perplexity
    causal_lm        dicts {input_ids, attention_mask, labels}; model(**inputs).logits; next-token
                     loss with the shift inside, padding (mask 0 or label -100) ignored; perplexity
    embedding        dicts {input_ids, attention_mask, ...}; the sentence embedding: mean of
                     last_hidden_state over unmasked tokens, L2-normalized (sentence-transformers'
                     pooling); no task loss (distill from the float model); cosine to the float
                     model's embeddings and top-1 nearest-neighbour agreement

Example:
    >>> task = make_task("causal_lm")
    >>> inputs, targets = task.split(batch)
    >>> loss = task.loss(task.forward(model, inputs), targets, inputs)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from qat.config import ConfigError
from qat.distill import mean_pool

IGNORE = -100


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """`batch` (a tensor, tuple/list or dict of tensors) on `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: move_batch(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(value, device) for value in batch)
    return batch


def model_output(model: nn.Module, inputs: Any) -> Any:
    """`model(**inputs)` for a dict (labels left out: qat computes the loss), else `model(inputs)`."""
    if isinstance(inputs, dict):
        return model(**{key: value for key, value in inputs.items() if key != "labels"})
    return model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits tensor of a model output (a tensor, or an object with `.logits`)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"the model returned a {type(output).__name__} without .logits; for an encoder use "
                        "task 'embedding'")
    return logits


def shifted_targets(inputs: dict, labels: Optional[Tensor]) -> Tensor:
    """Next-token targets (B, T-1): labels (or input_ids) shifted by one, IGNORE where padded."""
    labels = inputs["input_ids"] if labels is None else labels
    targets = labels[:, 1:].clone()
    mask = inputs.get("attention_mask")
    if mask is not None:
        targets[mask[:, 1:] == 0] = IGNORE
    return targets


class Task:
    """Classification on (x, label) tuples; the base of the other tasks."""

    name = "classification"
    has_loss = True

    def __init__(self, num_classes: Optional[int] = None) -> None:
        self.num_classes = num_classes
        self.reference: Optional[nn.Module] = None  # the float model, for tasks measured against it

    def split(self, batch: Any) -> tuple[Any, Any]:
        inputs, targets = batch
        return inputs, targets

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        return logits_of(model_output(model, inputs))

    def scored(self, output: Tensor) -> Tensor:
        """The logits that `targets` score, position for position (a causal LM drops its last position)."""
        return output

    def loss(self, output: Tensor, targets: Any, inputs: Any) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), targets.reshape(-1))

    def size(self, inputs: Any) -> int:
        """Samples in a batch (the weight of its mean loss)."""
        return len(inputs["input_ids"] if isinstance(inputs, dict) else inputs)

    def tokens(self, inputs: Any) -> int:
        """Tokens in a batch (throughput): unmasked tokens of dict batches, elements of token tensors."""
        if isinstance(inputs, dict):
            mask = inputs.get("attention_mask")
            return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return inputs.numel() if not inputs.is_floating_point() else len(inputs)

    def metrics(self, sync: bool = True) -> torchmetrics.MetricCollection:
        if not self.num_classes:
            raise ConfigError("classification needs num_classes (from the data module or the recipe)")
        c = self.num_classes
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.classification.MulticlassAccuracy(c, average="micro", sync_on_compute=sync),
            "ece": torchmetrics.classification.MulticlassCalibrationError(c, n_bins=15, sync_on_compute=sync),
        })

    def update(self, metrics: torchmetrics.MetricCollection, output: Tensor, targets: Any, inputs: Any) -> None:
        metrics.update(output.float().softmax(-1), targets)


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


TASKS = {task.name: task for task in (Task, LanguageModelTask, CausalLMTask, EmbeddingTask)}


def make_task(name: str, num_classes: Optional[int] = None) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not valid; allowed: {', '.join(map(repr, TASKS))}")
    return TASKS[name](num_classes)
