"""Measured kernel choices kept on disk, per machine, so every process picks the same kernel.

Autotuning times the CPU candidates on the first call of each (dtype, layer shape, M bucket,
threads, candidates). Timings are noisy: two processes could measure different winners, and
since the kernels round differently (bf16 compute, int8 activations), the same file would give
different outputs from run to run. The first measurement is therefore written to a JSON file
and every later process on the same machine reads it instead of measuring again:

    $QAT_KERNEL_CHOICES                              that file, or `off` (measure per process, keep nothing)
    $QAT_CACHE/kernel-choices/<machine>.json         otherwise (QAT_CACHE defaults to ~/.cache/qat)

<machine> is a digest of the CPU model and its feature flags, the torch version and the kernels'
source digest: another machine, a torch upgrade or new kernels measure afresh. Writes are atomic
(a temporary file renamed over the old one, merging what other processes wrote); a file that
cannot be read or written is ignored (the choice is then kept in this process only).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Optional

import torch

ENV_VAR = "QAT_KERNEL_CHOICES"
OFF = "off"
_KERNEL_SOURCES = ("autotune.py", "blocked.py", "cpu.py", "gemv_f32.py", "int8_act.py", "small_m.py", "native.py")


def _cpu_signature() -> str:
    """The CPU model and feature flags (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
        if wanted:
            return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line (every core repeats them)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _sources_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        with contextlib.suppress(OSError):
            digest.update((here / name).read_bytes())
    for path in sorted((here / "csrc").glob("*.cpp")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def machine_digest() -> str:
    """A short digest of what a measured choice depends on beyond its key: CPU, torch, kernel sources."""
    text = "\n".join((_cpu_signature(), torch.__version__, _sources_digest()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def choices_path() -> Optional[Path]:
    """The file of measured choices, or None when persistence is off."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured.lower() == OFF:
        return None
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("QAT_CACHE", Path.home() / ".cache" / "qat"))
    return cache / "kernel-choices" / f"{machine_digest()}.json"


def key_text(key: tuple) -> str:
    """A choice key (see autotune.choice_key) as a stable string: dtypes and tuples spelled out."""
    return json.dumps([str(part) if isinstance(part, torch.dtype) else part for part in key])


def read_choices(path: Path) -> dict[str, str]:
    """The stored choices (key text -> backend name); {} for a missing or unreadable file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def write_choice(path: Path, key: str, name: str) -> None:
    """Add one choice to the file (atomically, keeping the others'); I/O errors are ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**read_choices(path), key: name}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(merged, out, indent=0, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        pass
