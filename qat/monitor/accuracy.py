"""Label-free accuracy estimate: Average Thresholded Confidence (ATC; Garg et al., ICLR 2022, "Leveraging
unlabeled data to predict out-of-distribution performance").

On the labelled validation samples the calibration profile is taken on (qat.monitor.profile), find the
score threshold t such that the share of samples scoring at least t equals the validation accuracy a
(k of m correct: t is the k-th highest score). In production, the estimated accuracy of a window is the
share of its samples scoring at least t. Two scores are stored: the confidence (max softmax) and the
negative normalized entropy -H(p) / ln(classes) (the paper's ATC-NE, which it found better). Ties at t
(a float32 softmax saturates at 1.0) can make the validation share s exceed a, so the estimate is taken
relative to it:

    estimated accuracy = a + (window share - s),    estimated drop = s - window share

(exactly ATC when there are no ties, s = a). The test of the accuracy alert (qat.monitor.reference_free)
compares the window share with s, two binomial proportions (n window samples, m validation samples).

Example:
    >>> estimate = AccuracyEstimate.fit(confidence, entropy, correct)   # validation: per-sample tensors
    >>> estimate.hits(logits, "negative_entropy").mean()                 # a window's share above t
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

ESTIMATE_VERSION = 1
SCORES = ("confidence", "negative_entropy")


def atc_threshold(scores: Tensor, correct: Tensor) -> float:
    """The ATC threshold t of per-sample `scores` (m,) given which samples were classified `correct` (m,): the
    k-th highest score for k correct, so that k of the m scores are >= t (without ties at t). k = 0: just above
    the highest score (no sample reaches it)."""
    scores = scores.detach().double().reshape(-1)
    k = int(correct.reshape(-1).sum())
    if scores.numel() == 0:
        raise ValueError("no samples to fit the ATC threshold on")
    ordered = scores.sort(descending=True).values
    if k == 0:
        return math.nextafter(float(ordered[0]), math.inf)
    return float(ordered[k - 1])


def sample_scores(logits: Tensor) -> dict[str, Tensor]:
    """{score: (B,)} of logits (B, classes): the confidence (max softmax) and the negative normalized entropy
    -H(p) / ln(classes), float32."""
    log_p = torch.log_softmax(logits.detach().float(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1) / math.log(max(2, logits.shape[-1]))
    return {"confidence": log_p.max(-1).values.exp(), "negative_entropy": -entropy}


@dataclass
class Threshold:
    """One score's ATC threshold and the share of the validation samples scoring at least it."""

    threshold: float
    share: float


@dataclass
class AccuracyEstimate:
    """What the profile stores for the estimate (docs/FORMAT.md, key `accuracy` of the profile)."""

    samples: int  # labelled validation samples
    validation_accuracy: float
    thresholds: dict[str, Threshold] = field(default_factory=dict)
    method: str = "ATC"
    version: int = ESTIMATE_VERSION

    @classmethod
    def fit(cls, logits: Tensor, targets: Tensor) -> AccuracyEstimate:
        """From validation logits (m, classes) and class targets (m,)."""
        correct = logits.argmax(-1) == targets.reshape(-1).to(logits.device)
        scores = sample_scores(logits)
        thresholds = {}
        for name in SCORES:
            t = atc_threshold(scores[name], correct)
            thresholds[name] = Threshold(t, float((scores[name].double() >= t).double().mean()))
        return cls(int(correct.numel()), float(correct.double().mean()), thresholds)

    def hits(self, logits: Tensor, score: str = "negative_entropy") -> Tensor:
        """(B,) float64 1 / 0: whether each sample's `score` reaches the threshold."""
        return (sample_scores(logits)[score].double() >= self.thresholds[score].threshold).double()

    def to_json(self) -> dict:
        return {"version": self.version, "method": self.method, "samples": self.samples,
                "validation_accuracy": self.validation_accuracy,
                "thresholds": {name: {"threshold": t.threshold, "share": t.share}
                               for name, t in self.thresholds.items()}}

    @classmethod
    def from_json(cls, value: Any) -> Optional[AccuracyEstimate]:
        """The estimate, or None when `value` is one this qat does not read (a newer version, another method)."""
        if not isinstance(value, dict) or value.get("version") != ESTIMATE_VERSION or value.get("method") != "ATC":
            return None
        thresholds = {name: Threshold(float(t["threshold"]), float(t["share"]))
                      for name, t in value["thresholds"].items()}
        return cls(int(value["samples"]), float(value["validation_accuracy"]), thresholds)


def classification_targets(batch: Any, samples: int) -> Optional[Tensor]:
    """The class targets (samples,) of a loader batch `(inputs, targets, ...)` or `{..., "labels"}`, or None
    when it carries none of that shape (a language model's token labels, a regression target...)."""
    if isinstance(batch, dict):
        targets = batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        targets = batch[1]
    else:
        return None
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        return None
    targets = targets[:samples]
    return targets.reshape(-1) if targets.numel() == samples and targets.dim() <= 1 else None


def wilson_interval(hits: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion hits / n (95 % two-sided by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
