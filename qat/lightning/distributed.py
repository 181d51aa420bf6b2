"""Settings that keep a distributed run from hanging when one rank dies.

A rank that stops answering (killed, out of memory, a node lost) leaves the others
blocked in a collective. Gloo notices a peer whose connection closed and raises at once;
a peer that hangs without closing its connection is only noticed by the process group's
timeout. Lightning's default is 30 minutes; qat uses `QAT_DIST_TIMEOUT_S` seconds
(default 600), long enough for a checkpoint save or a calibration pass, short enough that
a hung job frees its machines.

When rank 0 fails, Lightning's launcher kills the ranks it started only on Ctrl+C; on any
other error they live on, one of them possibly hung for ever. `StopLaunchedRanks` kills
them whenever the launching process fails, so a failed job leaves no process behind.

Example:
    >>> DDPStrategy(timeout=process_group_timeout())
"""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import timedelta

import pytorch_lightning as pl

from qat.config import ConfigError

TIMEOUT_ENV = "QAT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600


def process_group_timeout() -> timedelta:
    """The collective timeout: `QAT_DIST_TIMEOUT_S` seconds (a positive number), else 600 s."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def is_launched_worker() -> bool:
    """True in a process Lightning's launcher started for a rank other than 0 (LOCAL_RANK > 0,
    or NODE_RANK > 0). Such a process joins the run rank 0 set up; it must not start a new one."""
    return any(int(os.environ.get(key, "0") or 0) > 0 for key in ("LOCAL_RANK", "NODE_RANK"))


class StopLaunchedRanks(pl.Callback):
    """On an exception in the process that launched the other ranks, SIGKILL those ranks that have
    not exited after `grace_s` seconds (a rank failing on the same error gets to report it first)."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and not is_launched_worker():
            for process in getattr(launcher, "procs", []):
                try:
                    process.wait(timeout=self.grace_s)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
