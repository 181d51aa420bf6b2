"""Accuracy and drift without a float model or labels: production statistics against the file's calibration profile.

`ReferenceFreeMonitor` hooks every activation quantizer of a deployed model (qat.monitor.profile),
keeps the per-sample features of the last `window` samples (bin shares of the values in code units,
clip rate; the output's confidence and entropy) and tests each against the profile:

    z = |window mean - profiled mean| / (profiled sample sd * sqrt(1/n + 1/m))

for every bin share and the clip rate of every channel (n samples in the window, m profiled). The
samples are independent, so by the central limit theorem z is close to N(0, 1) on clean data whatever
the correlation of the values inside one input (a binomial test on value counts would not be: it
takes thousands of correlated values of one image for independent draws). A channel alerts when one
of its features has z above the Bonferroni bound for `false_alarm` over all tested features, i.e.
z > Phi^-1(1 - false_alarm / (2 * features)), and moved by at least `min_shift` (an absolute share:
statistically certain but tiny moves are not drift that matters; a profiled sd of 0 counts as 1/m).
The PSI of each histogram is reported beside (effect size). The quantizer of the model's own input
(kind "input") measures data drift and only reports it unless `alert_on_input`.

Drift is not a loss of accuracy (a brightness shift the model shrugs off moves its first layers), so when the
profile holds the fit of the label-free accuracy estimate (qat.monitor.accuracy, from the labelled validation
samples of the profile) the monitor alerts on that instead and keeps the drift test as a warning
(`alert_on="accuracy"`, the default then; "drift" or "both" otherwise). The estimator (`estimator`): "doc"
(difference of confidences, the default: it tracked the true drop best in benchmarks/monitor/validation.md),
"atc_mc" or "atc_ne" (ATC with the confidence / the negative entropy). Each is the window mean of a per-sample
value v (the confidence; or 1 / 0, whether the sample's score reaches the ATC threshold) against its validation
mean b: estimated drop d = b - mean(v), estimated accuracy a - d (a: the validation accuracy), with a 95 %
interval over the window's samples (Wilson for ATC's shares, normal with the window's sd for DoC). The accuracy
alert fires when

    d >= min_accuracy_drop   and   d / sqrt(v0 (1/n + 1/m)) > Phi^-1(1 - false_alarm)

with v0 the per-sample variance of v on validation, at least p0 (1 - p0) for p0 = m / (m + 1) (a sample
may fall below all m validation ones): the drop is significant against the clean-data null (the window and
the validation samples from one distribution; one-sided, `false_alarm` per check) and at least the drop that
matters (the effect size, as `min_shift` is for drift). Requiring instead that the whole interval of d lie
above min_accuracy_drop would miss most true drops of 2-4 points within 500 samples (the sd of d is about 1
point there). The hooks keep a
strided copy of each activation; the histograms and the test run every `check_every` samples, over all
pending samples at once; `sample_every` k looks at every k-th sample only. Validated figures (detection,
false alarms, overhead): benchmarks/monitor/validation.md, overhead.md.

Example:
    >>> monitor = ReferenceFreeMonitor.from_file("model.safetensors", on_alert="log")
    >>> for batch in production:
    ...     status = monitor.update(monitor.model(batch))    # the hooks saw the forward
    >>> status.estimated_accuracy, status.accuracy_drop, status.alerting, status.layers[:3]
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from qat.monitor.accuracy import ESTIMATORS, wilson_interval
from qat.monitor.drift import signal_alert
from qat.monitor.profile import (
    KEY_PROFILE,
    ActivationTaps,
    CalibrationProfile,
    ProfileMissingError,
    build_profile,
    output_rows,
    output_values,
    read_profile,
)

LOGGER = logging.getLogger("qat.monitor")
ACCURACY_ROWS = "output.accuracy_value"  # add_rows key: per sample the estimator's value (AccuracyEstimate.values)
ALERT_ON = ("accuracy", "drift", "both")


@dataclass
class ChannelScore:
    """One channel's test against the profile over the window."""

    name: str
    z: float  # the largest z of its features that moved by at least min_shift (0 when none did)
    feature: str  # which feature: "clip rate" or "bin k" (k = 0 underflow .. bins + 1 overflow)
    psi: float  # population stability index sum((a - e) ln(a / e)) of its histogram vs the profile's (shares >= 1e-4)
    clip_rate: float
    profiled_clip_rate: float

    def __str__(self) -> str:
        clip = "" if self.name.startswith("output.") else \
            f", clip rate {self.clip_rate:.4f} vs {self.profiled_clip_rate:.4f} profiled"
        return f"{self.name} ({self.feature}, z={self.z:.1f}, PSI {self.psi:.3f}{clip})"


@dataclass
class ReferenceFreeStatus:
    """The window's sample count, each channel's score (highest first), the channels that drifted, the
    estimated accuracy and what alerts (`alerts`: an "accuracy ..." line and / or drifted channels, as
    `alert_on` says)."""

    samples: int
    threshold: float
    channels: list[ChannelScore] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    input_drift: list[str] = field(default_factory=list)  # input channels past the threshold (not alerting)
    drift: list[str] = field(default_factory=list)  # the other channels past the threshold, alerting or not
    estimated_accuracy: Optional[float] = None  # None: the profile has no accuracy estimate (or no samples yet)
    accuracy_interval: Optional[tuple[float, float]] = None  # 95 %, over the window's samples
    validation_accuracy: Optional[float] = None
    accuracy_drop: Optional[float] = None  # estimated: validation minus production, in [0, 1] units
    accuracy_z: Optional[float] = None  # the drop's z against the clean-data null
    accuracy_alert: bool = False

    @property
    def alerting(self) -> bool:
        return bool(self.alerts)

    @property
    def drifting(self) -> bool:
        return bool(self.drift)

    @property
    def layers(self) -> list[str]:
        """The drifted channels' names (alerting or a warning), most moved first."""
        return [line.split(" (")[0] for line in self.drift]

    def accuracy_text(self) -> str:
        if self.estimated_accuracy is None:
            return "accuracy estimate unavailable (profile without validation labels)" \
                if self.validation_accuracy is None else "accuracy estimate: no samples yet"
        low, high = self.accuracy_interval or (0.0, 1.0)
        return (f"estimated accuracy {100 * self.estimated_accuracy:.1f} % (95 % CI {100 * low:.1f}-{100 * high:.1f}) "
                f"vs {100 * self.validation_accuracy:.1f} % validation, drop {100 * self.accuracy_drop:.1f} points")

    def __str__(self) -> str:
        inputs = f"; input drift (not alerting): {'; '.join(self.input_drift)}" if self.input_drift else ""
        drift_alerts = [line for line in self.alerts if line in self.drift]
        warning = [line for line in self.drift if line not in drift_alerts]
        warnings = f"; drift (warning, not alerting): {'; '.join(warning)}" if warning else ""
        if not self.alerting:
            top = f", top {self.channels[0]}" if self.channels and not warning else ""
            return (f"last {self.samples} samples: ok ({self.accuracy_text()}; z threshold {self.threshold:.2f}{top})"
                    f"{warnings}{inputs}")
        parts = [f"accuracy falling: {self.accuracy_text()}"] if self.accuracy_alert else []
        parts += [f"drift in {'; '.join(drift_alerts)}"] if drift_alerts else []
        if not self.accuracy_alert:
            parts.append(self.accuracy_text())
        return f"last {self.samples} samples: {', '.join(parts)}{warnings}{inputs}"


def z_threshold(false_alarm: float, features: int) -> float:
    """Two-sided Bonferroni bound: P(any of `features` N(0, 1) z-scores exceeds it) <= false_alarm."""
    return NormalDist().inv_cdf(1 - false_alarm / (2 * max(1, features)))


class ReferenceFreeMonitor:
    """Sliding-window test of a deployed model's activation and output statistics; see the module docstring.

    Args:
        model: the deployed model (`qat.load`, or a fake-quant model); hooks are added to it.
        profile: its calibration profile (`read_profile(file)`, `build_profile(model, clean_batches)`).
        window: the samples the test looks at (the last ones).
        min_samples: no alert before the window holds this many.
        false_alarm: probability of a false alarm per check (Bonferroni over all features).
        min_shift: least absolute move of a bin share / clip rate that can alert.
        check_every: compute the statistics and test once this many samples are pending (the hooks only keep a
            strided copy of each activation; the histograms of many batches are computed at once, which costs
            the per-call overhead of ~100 small torch ops once instead of at every batch).
        sample_every: look at every k-th sample only (k = 1: all; counted across batches, so batch 1 works too):
            the hooks' cost / k; the window and min_samples count the samples looked at.
        alert_on_input: whether the quantizers of the model's input (kind "input": data drift, often harmless)
            alert too; by default they are only reported (`status.input_drift`).
        on_alert: "log" (warning on the `qat.monitor` logger once per crossing), "raise" (DriftError) or a
            function called with the status at each crossing.
        alert_on: "accuracy" (the estimated accuracy fell by at least `min_accuracy_drop`, significantly; drift is
            a warning: `status.drift`, logged once per crossing), "drift" (the drift test, as before the
            estimate existed) or "both"; default: "accuracy" when the profile holds the estimate, else "drift".
        min_accuracy_drop: least estimated drop of accuracy (0.02 = 2 points) that alerts.
        estimator: the accuracy estimator, "doc" (difference of confidences), "atc_mc" or "atc_ne" (ATC with the
            max softmax / negative entropy score).
    """

    def __init__(self, model: nn.Module, profile: CalibrationProfile, window: int = 500, min_samples: int = 100,
                 false_alarm: float = 1e-3, min_shift: float = 0.02, check_every: int = 128, sample_every: int = 1,
                 alert_on_input: bool = False, on_alert: Union[str, Callable[[ReferenceFreeStatus], None]] = "log",
                 top: int = 3, alert_on: Optional[str] = None, min_accuracy_drop: float = 0.02,
                 estimator: str = "doc") -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_samples <= window, got {window}, {min_samples}")
        if not 0 < false_alarm < 1 or min_shift < 0:
            raise ValueError(f"false_alarm must lie in (0, 1) and min_shift be >= 0, got {false_alarm}, {min_shift}")
        if not (callable(on_alert) or on_alert in ("raise", "log")):
            raise ValueError(f"on_alert must be 'raise', 'log' or a function, got {on_alert!r}")
        if alert_on not in (None, *ALERT_ON):
            raise ValueError(f"alert_on must be one of {ALERT_ON}, got {alert_on!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimate = profile.accuracy
        if alert_on in ("accuracy", "both") and self.estimate is None:
            raise ValueError(f"alert_on={alert_on!r} needs the profile's accuracy estimate (labelled validation "
                             "data at export); this profile has none: use alert_on='drift'")
        self.alert_on = alert_on or ("accuracy" if self.estimate is not None else "drift")
        self.min_accuracy_drop, self.estimator = min_accuracy_drop, estimator
        self.accuracy_threshold = NormalDist().inv_cdf(1 - false_alarm)  # one-sided z of the accuracy test
        self.model, self.profile, self.alert_on_input = model, profile, alert_on_input
        self.window, self.min_samples, self.min_shift, self.on_alert, self.top = (
            window, min_samples, min_shift, on_alert, top)
        self.sample_every, self.check_every = sample_every, check_every
        self._pending_outputs: list[Tensor] = []
        self._pending_samples = 0
        self.taps = ActivationTaps(model, profile.bins, profile.max_values, names=profile.channels, moments=False,
                                   sample_every=sample_every)
        self.names = [name for name in profile.channels]
        width = profile.bins + 3  # bins + 2 shares, clip rate
        self._columns = {name: slice(i * width, (i + 1) * width) for i, name in enumerate(self.names)}
        self._value_column = width * len(self.names)  # the estimator's value and its square, after the channels
        self._rows = torch.zeros(window, self._value_column + 2, dtype=torch.float64)
        expected = [profile.channels[name].expected() for name in self.names]  # (mean, sd) per channel
        self._expected_mean = torch.stack([mean for mean, _ in expected])  # (C, bins + 3)
        self._expected_sd = torch.stack([sd for _, sd in expected]).clamp_min(1 / max(1, profile.samples))
        base = self.estimate.baseline(estimator) if self.estimate is not None else 0.0
        self._neutral = torch.cat([self._expected_mean.reshape(-1),
                                   torch.tensor([base, base * base], dtype=torch.float64)])[None]
        self._sum = torch.zeros(self._rows.shape[1], dtype=torch.float64)
        self.threshold = z_threshold(false_alarm, len(self.names) * (profile.bins + 3))
        self._next, self._count, self._was_alerting, self._was_drifting = 0, 0, False, False
        self._last = self._empty_status()
        missing = sorted(set(self.names) - set(self.taps.bounds) - {"output.confidence", "output.entropy"})
        if missing:
            LOGGER.warning("profiled channels not found in the model (not monitored): %s", ", ".join(missing[:5]))
            self.names = [name for name in self.names if name not in missing]

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], clean: Optional[Iterable[Any]] = None,
                  kernel_backend: Optional[str] = None, **options: Any) -> ReferenceFreeMonitor:
        """Load a qat file and monitor it against its stored profile, or against one built from `clean`
        batches (needed for a file without a profile)."""
        from qat.export import load

        model = load(path, kernel_backend=kernel_backend).eval()
        profile = stored = read_profile(path)
        if profile is None and clean is None:
            raise ProfileMissingError(
                f"{path} has no calibration profile (metadata key {KEY_PROFILE}: files exported before qat "
                "stored one, or without validation data); give clean in-distribution data to build one "
                "(ReferenceFreeMonitor.from_file(path, clean=batches), `qat monitor FILE DATA --clean CLEAN`) "
                "or re-export the run with `qat export`")
        if clean is not None:
            profile = build_profile(model, clean, bins=profile.bins if profile else 16)
            if profile.accuracy is None and stored is not None:  # unlabelled clean data: the file's fit stays
                profile.accuracy = stored.accuracy
        return cls(model, profile, **options)

    def close(self) -> None:
        """Remove the hooks."""
        self.taps.close()

    def __enter__(self) -> ReferenceFreeMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @torch.no_grad()
    def __call__(self, *inputs: Any) -> Any:
        """Run the model on `inputs` and `update` with its outputs; returns the outputs."""
        outputs = self.model(*inputs)
        self.update(outputs)
        return outputs

    @torch.no_grad()
    def update(self, outputs: Any) -> ReferenceFreeStatus:
        """Add the batch the model just ran: `outputs` are its logits (B, ..., classes); the hooks saw its
        activations during that forward (call it after every forward of the model: a forward in between
        would be counted with the next batch). Returns the status of the last check (every `check_every`
        samples)."""
        logits = (outputs if isinstance(outputs, Tensor) else outputs[0])[self.taps.start:: self.sample_every].detach()
        self._pending_outputs.append(logits)
        self._pending_samples += logits.shape[0]
        if self._pending_samples < self.check_every:
            return self._last
        return self.flush()

    @torch.no_grad()
    def flush(self) -> ReferenceFreeStatus:
        """Test the samples pending (fewer than `check_every`) now: at the end of a batch job."""
        if not self._pending_samples:
            return self._last
        logits = torch.cat(self._pending_outputs)
        self._pending_outputs, self._pending_samples = [], 0
        rows = {**self.taps.take(logits.shape[0]), **output_rows(logits, self.profile.bins, moments=False)}
        if self.estimate is not None:
            values = output_values(logits)  # (B, rows, classes); the estimate exists for one row per sample
            rows[ACCURACY_ROWS] = self.estimate.values(values.reshape(-1, values.shape[-1]), self.estimator) \
                .reshape(values.shape[0], -1).mean(1, keepdim=True)
        return self.add_rows(rows)

    def add_rows(self, rows: dict[str, Tensor]) -> ReferenceFreeStatus:
        """Add per-sample feature rows ({channel: (samples, bins + 3 or more)}: shares, clip rate, ...; see
        qat.monitor.profile.feature_rows; ACCURACY_ROWS: (samples, 1) the accuracy estimator's per-sample value,
        `estimate.values`) and check: what `update` does after the hooks (also for replaying recorded
        traffic)."""
        samples = next(iter(rows.values())).shape[0]
        block = self._neutral.repeat(samples, 1)  # a channel without rows this batch: no evidence either way
        for name in self.names:
            if name in rows:
                block[:, self._columns[name]] = rows[name][:, : self.profile.bins + 3].double()
        if ACCURACY_ROWS in rows:
            value = rows[ACCURACY_ROWS].reshape(samples).double()
            block[:, self._value_column], block[:, self._value_column + 1] = value, value * value
        block = block[-self.window:]
        positions = (self._next + torch.arange(block.shape[0])) % self.window
        # a running sum over the window: small ops only (a reduction over the whole window runs multithreaded
        # and costs ~8 ms on a busy 2-core machine against 0.02 ms on one thread); exact again at each wrap
        self._sum += block.sum(0) - self._rows[positions].sum(0)
        self._rows[positions] = block
        self._next = (self._next + block.shape[0]) % self.window
        self._count = min(self.window, self._count + block.shape[0])
        if self._next < block.shape[0]:
            self._sum = self._rows.sum(0)
        status = self._last = self.status
        self._alert(status)
        return status

    def reset(self) -> None:
        """Forget the window."""
        self._next, self._count, self._was_alerting, self._was_drifting = 0, 0, False, False
        self._last = self._empty_status()
        self._pending_outputs, self._pending_samples = [], 0
        self.taps.pending = {}
        self._rows.zero_()
        self._sum.zero_()

    @property
    def status(self) -> ReferenceFreeStatus:
        """Each channel's test over the current window (see the module docstring)."""
        n, m = self._count, self.profile.samples
        if n == 0:
            return self._empty_status()
        bins = self.profile.bins
        means = (self._sum[: self._value_column] / n).reshape(len(self._columns), bins + 3)  # (C, shares + clip rate)
        delta = (means - self._expected_mean).abs()
        z = delta / (self._expected_sd * math.sqrt(1 / n + 1 / max(1, m)))
        z = torch.where(delta >= self.min_shift, z, torch.zeros_like(z)).nan_to_num(0.0)
        a, e = means[:, : bins + 2].clamp_min(1e-4), self._expected_mean[:, : bins + 2].clamp_min(1e-4)
        psis = ((a - e) * (a / e).log()).sum(1).tolist()
        z_rows, clip, profiled_clip = z.tolist(), means[:, bins + 2].tolist(), self._expected_mean[:, bins + 2].tolist()
        scores = []  # in Python: torch's max over a dim of a tiny tensor costs ~7 ms on a busy 2-thread CPU
        for i, name in enumerate(self._columns):
            if name not in self.names:
                continue
            worst = max(range(bins + 3), key=z_rows[i].__getitem__)
            feature = "clip rate" if worst == bins + 2 else f"bin {worst}"
            scores.append(ChannelScore(name, z_rows[i][worst], feature, psis[i], clip[i], profiled_clip[i]))
        scores.sort(key=lambda score: (-score.z, -score.psi))
        moved = [s for s in scores if s.z > self.threshold] if n >= self.min_samples else []
        is_input = {name for name, c in self.profile.channels.items() if c.kind == "input"}
        drift = [str(s) for s in moved if self.alert_on_input or s.name not in is_input][: self.top]
        inputs = [str(s) for s in moved if s.name in is_input and not self.alert_on_input]
        status = ReferenceFreeStatus(n, self.threshold, scores, [], inputs, drift)
        self._estimate_accuracy(status, float(self._sum[self._value_column]), float(self._sum[self._value_column + 1]))
        status.alerts = ([status.accuracy_text()] if status.accuracy_alert else []) + \
            (drift if self.alert_on in ("drift", "both") else [])
        return status

    def _empty_status(self) -> ReferenceFreeStatus:
        accuracy = None if self.estimate is None else self.estimate.validation_accuracy
        return ReferenceFreeStatus(0, self.threshold, validation_accuracy=accuracy)

    def _estimate_accuracy(self, status: ReferenceFreeStatus, total: float, squares: float) -> None:
        """Fill in the estimate of the window's accuracy and the accuracy alert (see the module docstring)."""
        if self.estimate is None:
            return
        n, m = status.samples, max(1, self.estimate.samples)
        a, base = self.estimate.validation_accuracy, self.estimate.baseline(self.estimator)
        mean = min(max(total / n, 0.0), 1.0)  # the running sum's rounding
        drop = base - mean
        if self.estimator == "doc":
            half = 1.959963984540054 * math.sqrt(max(0.0, squares / n - mean * mean) / n)
            low, high = mean - half, mean + half
        else:
            low, high = wilson_interval(mean * n, n)
        z = drop / math.sqrt(self.estimate.null_variance(self.estimator) * (1 / n + 1 / m))
        status.validation_accuracy, status.accuracy_drop, status.accuracy_z = a, drop, z
        status.estimated_accuracy = min(1.0, max(0.0, a - drop))
        status.accuracy_interval = (min(1.0, max(0.0, a - base + low)), min(1.0, max(0.0, a - base + high)))
        status.accuracy_alert = self.alert_on in ("accuracy", "both") and n >= self.min_samples and \
            drop >= self.min_accuracy_drop and z > self.accuracy_threshold

    def _alert(self, status: ReferenceFreeStatus) -> None:
        self._was_alerting = signal_alert(status, self.on_alert, self._was_alerting, f"qat.monitor: {status}")
        warned = status.drifting and self.alert_on == "accuracy"
        if warned and not self._was_drifting:
            LOGGER.warning("drift (warning, not alerting): %s", "; ".join(status.drift))
        self._was_drifting = warned
