"""Errors that need nothing beyond Python: the `qat` command names them without importing torch.

`ConfigError` is re-exported by `qat.config` (where the settings that raise it live) and `qat`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A quantization setting or recipe value is invalid; the message names the field."""
