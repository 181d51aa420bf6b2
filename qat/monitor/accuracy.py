"""Label-free accuracy estimates from the output's confidence, fit on the labelled validation samples the
calibration profile is taken on (qat.monitor.profile); three published estimators:

- DoC, difference of confidences (Guillory et al., ICCV 2021, "Predicting with confidence on unseen
  distributions"): estimated drop = mean confidence (max softmax) on validation - mean on the window;
  estimated accuracy = validation accuracy - drop.
- ATC, average thresholded confidence (Garg et al., ICLR 2022, "Leveraging unlabeled data to predict
  out-of-distribution performance"): on the validation samples, find the score threshold t such that the
  share of samples scoring at least t equals the validation accuracy a (k of m correct: t is the k-th
  highest score); in production the estimated accuracy is the share of the window's samples scoring at
  least t. Scores: the confidence (ATC-MC) or the negative normalized entropy -H(p) / ln(classes) (ATC-NE,
  which the paper found better). Ties at t (a float32 softmax saturates at 1.0) can make the validation
  share s exceed a, so the estimate is taken relative to it: estimated accuracy = a + (window share - s),
  drop = s - window share (exactly ATC when there are no ties, s = a).

Each is "the window's mean of a per-sample value, against its validation mean" (`values`, `baseline`), which the
monitor's accuracy test compares as two sample means (qat.monitor.reference_free).

Example:
    >>> estimate = AccuracyEstimate.fit(validation_logits, validation_targets)
    >>> estimate.baseline("doc") - estimate.values(window_logits, "doc").mean()   # the estimated drop
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

ESTIMATE_VERSION = 1
SCORES = ("confidence", "negative_entropy")
ESTIMATORS = ("doc", "atc_mc", "atc_ne")  # difference of confidences; ATC with the confidence / negative entropy
ATC_SCORES = {"atc_mc": "confidence", "atc_ne": "negative_entropy"}


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
    """What the profile stores for the estimates (docs/FORMAT.md, key `accuracy` of the profile): the validation
    accuracy, the mean and sd of the confidence (DoC) and each ATC score's threshold."""

    samples: int  # labelled validation samples
    validation_accuracy: float
    mean_confidence: float
    confidence_sd: float
    thresholds: dict[str, Threshold] = field(default_factory=dict)
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
        confidence = scores["confidence"].double()
        return cls(int(correct.numel()), float(correct.double().mean()), float(confidence.mean()),
                   float(confidence.std(unbiased=False)), thresholds)

    def values(self, logits: Tensor, estimator: str = "doc") -> Tensor:
        """(B,) float64 per-sample values whose window mean the estimator compares with `baseline`: the confidence
        (DoC), or 1 / 0 whether the sample's score reaches the ATC threshold."""
        scores = sample_scores(logits)
        if estimator == "doc":
            return scores["confidence"].double()
        score = ATC_SCORES[estimator]
        return (scores[score].double() >= self.thresholds[score].threshold).double()

    def hits(self, logits: Tensor, score: str = "negative_entropy") -> Tensor:
        """(B,) float64 1 / 0: whether each sample's ATC `score` reaches its threshold."""
        return (sample_scores(logits)[score].double() >= self.thresholds[score].threshold).double()

    def baseline(self, estimator: str = "doc") -> float:
        """The validation samples' mean of `values`: estimated drop = baseline - the window's mean."""
        return self.mean_confidence if estimator == "doc" else self.thresholds[ATC_SCORES[estimator]].share

    def null_variance(self, estimator: str = "doc") -> float:
        """The per-sample variance of `values` on clean data for the accuracy test: the validation share's
        binomial p0 (1 - p0) (ATC) or the confidence's variance (DoC), at least the binomial one of
        p0 = m / (m + 1) (a sample may fall below all m validation ones; it also tames the confidence's
        heavy lower tail)."""
        m = max(1, self.samples)
        low = m / (m + 1) ** 2
        if estimator == "doc":
            return max(self.confidence_sd ** 2, low)
        p0 = min(max(self.baseline(estimator), 1 / (m + 1)), m / (m + 1))
        return p0 * (1 - p0)

    def to_json(self) -> dict:
        return {"version": self.version, "samples": self.samples, "validation_accuracy": self.validation_accuracy,
                "confidence": {"mean": self.mean_confidence, "sd": self.confidence_sd},
                "thresholds": {name: {"threshold": t.threshold, "share": t.share}
                               for name, t in self.thresholds.items()}}

    @classmethod
    def from_json(cls, value: Any) -> Optional[AccuracyEstimate]:
        """The estimate, or None when `value` is one this qat does not read (a newer version)."""
        if not isinstance(value, dict) or value.get("version") != ESTIMATE_VERSION:
            return None
        thresholds = {name: Threshold(float(t["threshold"]), float(t["share"]))
                      for name, t in value["thresholds"].items()}
        return cls(int(value["samples"]), float(value["validation_accuracy"]), float(value["confidence"]["mean"]),
                   float(value["confidence"]["sd"]), thresholds)


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
