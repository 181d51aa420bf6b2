"""Watching a deployed int4 model: drift against a reference, and the golden self-check of a file.

    DriftMonitor / DriftStatus / DriftError   agreement and KL over a sliding window (qat.monitor.drift)
    check_golden                              the file's stored golden outputs against the model
"""

from qat.monitor.drift import DriftError, DriftMonitor, DriftStatus, check_golden, sample_statistics

__all__ = ["DriftError", "DriftMonitor", "DriftStatus", "check_golden", "sample_statistics"]
