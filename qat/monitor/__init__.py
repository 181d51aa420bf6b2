"""Watching a deployed int4 model: drift against a reference, drift against the file's calibration profile,
and the golden self-check of a file.

    DriftMonitor / DriftStatus / DriftError   agreement and KL over a sliding window (qat.monitor.drift)
    check_golden                              the file's stored golden outputs against the model
    ReferenceFreeMonitor / ReferenceFreeStatus the label-free accuracy estimate and its alert; activation clip rates /
                                              histograms and output confidence against the calibration profile, no
                                              float model (qat.monitor.reference_free)
    AccuracyEstimate                          the estimators' fit on labelled validation data: DoC, ATC
                                              (qat.monitor.accuracy)
    build_profile / read_profile              the calibration profile (qat.monitor.profile)
"""

from qat.monitor.accuracy import AccuracyEstimate
from qat.monitor.drift import DriftError, DriftMonitor, DriftStatus, check_golden, sample_statistics
from qat.monitor.profile import CalibrationProfile, ProfileMissingError, build_profile, read_profile
from qat.monitor.reference_free import ReferenceFreeMonitor, ReferenceFreeStatus

__all__ = ["AccuracyEstimate", "CalibrationProfile", "DriftError", "DriftMonitor", "DriftStatus", "ProfileMissingError",
           "ReferenceFreeMonitor", "ReferenceFreeStatus", "build_profile", "check_golden", "read_profile",
           "sample_statistics"]
