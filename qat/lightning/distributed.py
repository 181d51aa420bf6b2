"""Settings that keep a distributed run from hanging when one rank dies.

A rank that stops answering (killed, out of memory, a node lost) leaves the others
blocked in a collective. Gloo notices a peer whose connection closed and raises at once;
a peer that hangs without closing its connection is only noticed by the process group's
timeout. Lightning's default is 30 minutes; qat uses `QAT_DIST_TIMEOUT_S` seconds
(default 600), long enough for a checkpoint save or a calibration pass, short enough that
a hung job frees its machines.

Example:
    >>> DDPStrategy(timeout=process_group_timeout())
"""

from __future__ import annotations

import os
from datetime import timedelta

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
