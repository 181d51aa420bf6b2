"""Metrics beyond accuracy: plain functions on tensors (logits, probabilities, labels).

Every function takes already-computed outputs, so the same code serves image
classifiers, token-level language models (logits flattened to (N, V)) and Hugging Face
models alike. `reference` always means the float model.

    agreement        fraction of rows where argmax(model) == argmax(reference)
    flips            correct -> wrong and wrong -> correct, counted separately
    mean_kl          mean over rows of KL(reference || model) of the softmax distributions
    ece              expected calibration error (torchmetrics), top-1, equal-width bins
    per_class        accuracy per label, worst first, with the support of each
    perplexity_ratio exp(mean NLL(model)) / exp(mean NLL(reference))
    mean_cosine      mean cosine similarity of embeddings to the reference's, row by row
    neighbour_agreement  share of rows whose nearest other row (by cosine) is the same as
                     under the reference embeddings (top-1 nearest-neighbour agreement)

Example:
    >>> flips(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]))
    {'correct_to_wrong': 1, 'wrong_to_correct': 0, 'count': 3, ...}
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error

from qat.tasks import nearest_neighbours


def _rows(logits: Tensor) -> Tensor:
    """(..., C) -> (N, C) float32."""
    return logits.reshape(-1, logits.shape[-1]).float()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of (N, C) logits against (N,) labels."""
    hits = _rows(logits).argmax(-1) == labels.reshape(-1)
    return int(hits.sum()) / hits.numel()


def agreement(logits: Tensor, reference_logits: Tensor) -> float:
    """Fraction of rows whose top-1 prediction equals the reference's (LMs: same-top-token rate)."""
    same = _rows(logits).argmax(-1) == _rows(reference_logits).argmax(-1)
    return int(same.sum()) / same.numel()


def flips(predictions: Tensor, reference_predictions: Tensor, labels: Tensor) -> dict[str, Any]:
    """Predictions that changed correctness against the reference (Dutta et al. 2024).

    Returns counts and rates: `correct_to_wrong` (the reference was right, the model is
    wrong), `wrong_to_correct` (the reverse), `changed` (any differing prediction, also
    wrong -> other wrong) and `count`; rates are over `count`.
    """
    pred, ref, y = predictions.reshape(-1), reference_predictions.reshape(-1), labels.reshape(-1)
    if not pred.shape == ref.shape == y.shape:
        raise ValueError(f"flips: shapes differ: predictions {list(pred.shape)}, reference {list(ref.shape)}, "
                         f"labels {list(y.shape)}")
    ref_ok, ok = ref == y, pred == y
    counts = {"correct_to_wrong": int((ref_ok & ~ok).sum()), "wrong_to_correct": int((~ref_ok & ok).sum()),
              "changed": int((pred != ref).sum()), "count": int(y.numel())}
    total = max(counts["count"], 1)
    rates = {f"{key}_rate": counts[key] / total for key in ("correct_to_wrong", "wrong_to_correct", "changed")}
    return {**counts, **rates}


def mean_kl(logits: Tensor, reference_logits: Tensor) -> float:
    """Mean over rows of KL(reference || model), in nats, of softmax(logits) along the last dim."""
    log_p = F.log_softmax(_rows(reference_logits), -1)
    log_q = F.log_softmax(_rows(logits), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def ece(probabilities: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error (top-1 confidence, `bins` equal-width bins; torchmetrics)."""
    probs = _rows(probabilities)
    return float(multiclass_calibration_error(probs, labels.reshape(-1), probs.shape[-1], n_bins=bins))


def reliability_bins(probabilities: Tensor, labels: Tensor, bins: int = 15) -> list[dict[str, float]]:
    """The reliability diagram behind `ece`: per confidence bin (lo, hi] its count, mean
    confidence and accuracy; empty bins are left out. ECE = sum(count * |acc - conf|) / N."""
    probs = _rows(probabilities)
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels.reshape(-1)).float()
    edges = torch.linspace(0, 1, bins + 1)
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)  # (lo, hi] bins
    rows = []
    for b in range(bins):
        member = index == b
        if member.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(member.sum()),
                         "confidence": float(confidence[member].mean()),
                         "accuracy": int(correct[member].sum()) / int(member.sum())})
    return rows


def per_class(logits: Tensor, labels: Tensor, names: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Accuracy of each label present in `labels`, worst first (ties: larger class first)."""
    pred, y = _rows(logits).argmax(-1), labels.reshape(-1)
    rows = []
    for cls in y.unique().tolist():
        member = y == cls
        rows.append({"slice": names[cls] if names else str(cls), "size": int(member.sum()),
                     "accuracy": int((pred[member] == cls).sum()) / int(member.sum())})
    return sorted(rows, key=lambda r: (r["accuracy"], -r["size"]))


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood (cross entropy) in nats."""
    return float(F.cross_entropy(_rows(logits), labels.reshape(-1)))


def perplexity(logits: Tensor, labels: Tensor) -> float:
    """exp(mean NLL)."""
    return math.exp(nll(logits, labels))


def perplexity_ratio(logits: Tensor, reference_logits: Tensor, labels: Tensor) -> float:
    """Perplexity of the model over the reference's (1.0: no loss; llama.cpp reports the same)."""
    return math.exp(nll(logits, labels) - nll(reference_logits, labels))


def gap_recovered(float_value: float, ptq_value: float, qat_value: float) -> Optional[float]:
    """Percent of the PTQ gap that QAT recovers: 100 * (qat - ptq) / (float - ptq).

    None when PTQ equals float (no gap to recover). Works for either direction of
    "better" (accuracy up, KL or perplexity down): the sign comes from the gap.
    """
    gap = float_value - ptq_value
    if abs(gap) < 1e-12:
        return None
    return 100.0 * (qat_value - ptq_value) / gap


def mean_cosine(embeddings: Tensor, reference_embeddings: Tensor) -> float:
    """Mean over rows of cos(embedding, reference embedding) for (N, H) embeddings."""
    return float(F.cosine_similarity(embeddings.float(), reference_embeddings.float(), dim=-1).mean())


def neighbour_agreement(embeddings: Tensor, reference_embeddings: Tensor) -> float:
    """Share of the N rows whose nearest other row by cosine is the one the reference picks."""
    if embeddings.shape[0] < 2:
        raise ValueError(f"nearest-neighbour agreement needs at least 2 embeddings; got {embeddings.shape[0]}")
    mine = nearest_neighbours(F.normalize(embeddings.float(), dim=-1))
    theirs = nearest_neighbours(F.normalize(reference_embeddings.float(), dim=-1))
    return float((mine == theirs).float().mean())
