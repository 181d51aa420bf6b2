"""Drift in service: top-1 agreement and KL of the deployed model against a reference, over a sliding window.

A sample is one row of the last dimension of the logits (an image, or one token position of
an LM). For each sample the monitor records whether the deployed model's top-1 class equals
the reference's, and KL(reference || deployed) of their softmax distributions (float32, in
nats). Over the last `window` samples it keeps the agreement rate and the mean KL; once it
holds at least `min_samples` samples, crossing `min_agreement` or `max_kl` raises
`DriftError` (`on_alert="raise"`), logs a warning on the `qat.monitor` logger (`"log"`, once
per crossing, and once again when it recovers), or calls your function with the status.

The reference is the float (or QAT) model run on the same production batches, or the golden
outputs stored in the file (`check_golden`).

Example:
    >>> monitor = DriftMonitor(window=2000, min_agreement=0.99, max_kl=0.02, on_alert="log")
    >>> for batch in production:
    ...     status = monitor.update(int4_model(batch), float_model(batch))
    >>> status.agreement, status.kl, status.alerting
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.export.golden import output_tensor
from qat.export.manifest import read_golden

LOGGER = logging.getLogger("qat.monitor")


class DriftError(RuntimeError):
    """The deployed model's outputs drifted past a threshold (`DriftMonitor(on_alert="raise")`)."""


def signal_alert(status: Any, on_alert: Union[str, Callable], was_alerting: bool, raise_message: str) -> bool:
    """Act on a monitor's status as `on_alert` asks: 'raise' raises DriftError(raise_message) while alerting;
    'log' or a function hears of each crossing (into alert: a warning; back out: info). Returns whether the
    status alerts (the monitor's next `was_alerting`)."""
    if status.alerting and on_alert == "raise":
        raise DriftError(raise_message)
    if status.alerting != was_alerting:
        if callable(on_alert):
            on_alert(status)
        elif status.alerting:
            LOGGER.warning("drift: %s", status)
        else:
            LOGGER.info("recovered: %s", status)
    return status.alerting


@dataclass
class DriftStatus:
    """Where the window stands: sample count, agreement rate, mean KL and the crossed thresholds."""

    samples: int
    agreement: float
    kl: float
    alerts: list[str] = field(default_factory=list)

    @property
    def alerting(self) -> bool:
        return bool(self.alerts)

    def __str__(self) -> str:
        state = "; ".join(self.alerts) if self.alerts else "ok"
        return f"last {self.samples} samples: top-1 agreement {self.agreement:.4f}, mean KL {self.kl:.3g} ({state})"


def sample_statistics(outputs: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample top-1 agreement (bool) and KL(reference || outputs) (float32, nats) of logits (..., C)."""
    if outputs.shape != reference.shape:
        raise ValueError(f"outputs {list(outputs.shape)} and reference {list(reference.shape)} differ in shape")
    if outputs.dim() == 0 or outputs.shape[-1] < 2:
        raise ValueError(f"expected logits (..., classes) with at least 2 classes, got shape {list(outputs.shape)}")
    classes = outputs.shape[-1]
    out = outputs.detach().float().reshape(-1, classes)
    ref = reference.detach().float().reshape(-1, classes).to(out.device)
    agree = out.argmax(-1) == ref.argmax(-1)
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    return agree.cpu(), kl.clamp_min(0).cpu()


class DriftMonitor:
    """Sliding-window agreement / KL tracker; see the module docstring."""

    def __init__(self, window: int = 1000, min_agreement: float = 0.99, max_kl: float = 0.01,
                 min_samples: int = 100, on_alert: Union[str, Callable[[DriftStatus], None]] = "log") -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_samples <= window, got {window}, {min_samples}")
        if not 0 <= min_agreement <= 1 or max_kl < 0:
            raise ValueError(f"min_agreement must lie in [0, 1] and max_kl be >= 0, got {min_agreement}, {max_kl}")
        if not (callable(on_alert) or on_alert in ("raise", "log")):
            raise ValueError(f"on_alert must be 'raise', 'log' or a function, got {on_alert!r}")
        self.window, self.min_samples, self.on_alert = window, min_samples, on_alert
        self.min_agreement, self.max_kl = min_agreement, max_kl
        self._agree = torch.zeros(window, dtype=torch.bool)
        self._kl = torch.zeros(window, dtype=torch.float64)
        self._next, self._count, self._was_alerting = 0, 0, False

    def _push(self, agree: Tensor, kl: Tensor) -> None:
        agree, kl = agree[-self.window:], kl[-self.window:].double()
        positions = (self._next + torch.arange(agree.numel())) % self.window
        self._agree[positions], self._kl[positions] = agree, kl
        self._next = (self._next + agree.numel()) % self.window
        self._count = min(self.window, self._count + agree.numel())

    @property
    def status(self) -> DriftStatus:
        """The current window's statistics and the thresholds it crosses."""
        n = self._count
        if n == 0:
            return DriftStatus(0, 1.0, 0.0)
        agreement, kl = float(self._agree[:n].double().mean()), float(self._kl[:n].mean())
        alerts = []
        if n >= self.min_samples and agreement < self.min_agreement:
            alerts.append(f"top-1 agreement {agreement:.4f} < {self.min_agreement}")
        if n >= self.min_samples and kl > self.max_kl:
            alerts.append(f"mean KL {kl:.3g} > {self.max_kl}")
        return DriftStatus(n, agreement, kl, alerts)

    def update(self, outputs: Tensor, reference: Tensor) -> DriftStatus:
        """Add a batch: the deployed model's logits and the reference's on the same inputs."""
        self._push(*sample_statistics(outputs, reference))
        status = self.status
        self._alert(status)
        return status

    def _alert(self, status: DriftStatus) -> None:
        self._was_alerting = signal_alert(status, self.on_alert, self._was_alerting, f"qat.monitor: drift: {status}")


@torch.no_grad()
def check_golden(model: nn.Module, path: Union[str, os.PathLike], monitor: Optional[DriftMonitor] = None,
                 ) -> DriftStatus:
    """Run the golden inputs of a qat file through `model` and feed the monitor with the golden outputs
    as reference (a start-up or periodic check when no float model is at hand)."""
    golden = read_golden(path)
    if golden is None or not golden.complete:
        raise ValueError(f"{path}: no complete golden outputs to compare with (export with golden_inputs=...)")
    monitor = monitor or DriftMonitor(min_samples=1)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    output = output_tensor(model(*(t.to(device) for t in golden.inputs)))
    return monitor.update(output, golden.output.reshape(golden.output_shape))
