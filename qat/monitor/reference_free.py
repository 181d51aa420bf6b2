"""Drift without a float model: production statistics against the file's calibration profile.

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
(kind "input") measures data drift and only reports it unless `alert_on_input`. The hooks keep a
strided copy of each activation; the histograms and the test run every `check_every` samples, over all
pending samples at once; `sample_every` k looks at every k-th sample only. Validated figures (detection,
false alarms, overhead): benchmarks/monitor/validation.md, overhead.md.

Example:
    >>> monitor = ReferenceFreeMonitor.from_file("model.safetensors", on_alert="log")
    >>> for batch in production:
    ...     status = monitor.update(monitor.model(batch))    # the hooks saw the forward
    >>> status.alerting, status.layers[:3]
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

from qat.monitor.drift import signal_alert
from qat.monitor.profile import (
    KEY_PROFILE,
    ActivationTaps,
    CalibrationProfile,
    ProfileMissingError,
    build_profile,
    output_rows,
    read_profile,
)

LOGGER = logging.getLogger("qat.monitor")


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
    """The window's sample count, each channel's score (highest first) and the channels alerting."""

    samples: int
    threshold: float
    channels: list[ChannelScore] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    input_drift: list[str] = field(default_factory=list)  # input channels past the threshold (not alerting)

    @property
    def alerting(self) -> bool:
        return bool(self.alerts)

    @property
    def layers(self) -> list[str]:
        """The alerting channels' names, most moved first."""
        return [alert.split(" (")[0] for alert in self.alerts]

    def __str__(self) -> str:
        inputs = f"; input drift (not alerting): {'; '.join(self.input_drift)}" if self.input_drift else ""
        if not self.alerting:
            top = f"; top {self.channels[0]}" if self.channels else ""
            return f"last {self.samples} samples: ok (z threshold {self.threshold:.2f}{top}){inputs}"
        return f"last {self.samples} samples: drift in {'; '.join(self.alerts)}{inputs}"


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
    """

    def __init__(self, model: nn.Module, profile: CalibrationProfile, window: int = 500, min_samples: int = 100,
                 false_alarm: float = 1e-3, min_shift: float = 0.02, check_every: int = 128, sample_every: int = 1,
                 alert_on_input: bool = False, on_alert: Union[str, Callable[[ReferenceFreeStatus], None]] = "log",
                 top: int = 3) -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_samples <= window, got {window}, {min_samples}")
        if not 0 < false_alarm < 1 or min_shift < 0:
            raise ValueError(f"false_alarm must lie in (0, 1) and min_shift be >= 0, got {false_alarm}, {min_shift}")
        if not (callable(on_alert) or on_alert in ("raise", "log")):
            raise ValueError(f"on_alert must be 'raise', 'log' or a function, got {on_alert!r}")
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
        self._rows = torch.zeros(window, width * len(self.names), dtype=torch.float64)
        expected = [profile.channels[name].expected() for name in self.names]  # (mean, sd) per channel
        self._expected_mean = torch.stack([mean for mean, _ in expected])  # (C, bins + 3)
        self._expected_sd = torch.stack([sd for _, sd in expected]).clamp_min(1 / max(1, profile.samples))
        self._neutral = self._expected_mean.reshape(1, -1)
        self._sum = torch.zeros(self._rows.shape[1], dtype=torch.float64)
        self.threshold = z_threshold(false_alarm, len(self.names) * (profile.bins + 3))
        self._next, self._count, self._was_alerting = 0, 0, False
        self._last = ReferenceFreeStatus(0, self.threshold)
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
        profile = read_profile(path)
        if profile is None and clean is None:
            raise ProfileMissingError(
                f"{path} has no calibration profile (metadata key {KEY_PROFILE}: files exported before qat "
                "stored one, or without validation data); give clean in-distribution data to build one "
                "(ReferenceFreeMonitor.from_file(path, clean=batches), `qat monitor FILE DATA --clean CLEAN`) "
                "or re-export the run with `qat export`")
        if clean is not None:
            profile = build_profile(model, clean, bins=profile.bins if profile else 16)
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
        return self.add_rows(rows)

    def add_rows(self, rows: dict[str, Tensor]) -> ReferenceFreeStatus:
        """Add per-sample feature rows ({channel: (samples, bins + 3 or more)}: shares, clip rate, ...; see
        qat.monitor.profile.feature_rows) and check: what `update` does after the hooks (also for replaying
        recorded traffic)."""
        samples = next(iter(rows.values())).shape[0]
        block = self._neutral.repeat(samples, 1)  # a channel without rows this batch: no evidence either way
        for name in self.names:
            if name in rows:
                block[:, self._columns[name]] = rows[name][:, : self.profile.bins + 3].double()
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
        self._next, self._count, self._was_alerting = 0, 0, False
        self._last = ReferenceFreeStatus(0, self.threshold)
        self._pending_outputs, self._pending_samples = [], 0
        self.taps.pending = {}
        self._rows.zero_()
        self._sum.zero_()

    @property
    def status(self) -> ReferenceFreeStatus:
        """Each channel's test over the current window (see the module docstring)."""
        n, m = self._count, self.profile.samples
        if n == 0:
            return ReferenceFreeStatus(0, self.threshold)
        bins = self.profile.bins
        means = (self._sum / n).reshape(len(self._columns), bins + 3)  # (C, shares + clip rate)
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
        alerting = [s for s in moved if self.alert_on_input or s.name not in is_input]
        inputs = [str(s) for s in moved if s.name in is_input and not self.alert_on_input]
        return ReferenceFreeStatus(n, self.threshold, scores, [str(s) for s in alerting[: self.top]], inputs)

    def _alert(self, status: ReferenceFreeStatus) -> None:
        self._was_alerting = signal_alert(status, self.on_alert, self._was_alerting, f"qat.monitor: {status}")
