"""Keep freed memory in the process heap on glibc (Linux): fewer page faults for the large activation buffers
a CNN allocates and frees at every training step.

glibc serves allocations above a threshold (dynamically 128 KiB .. 32 MiB) with mmap and gives them back to
the kernel on free, so a tensor of a few MiB freed and allocated again each step costs fresh zero-filled
pages every time. Measured on EfficientNet-Lite0 at 64x64, batch 64 (2-core AVX2 EPYC, torch 2.13): 4x fewer
minor page faults, about 2-10 % shorter steps; in the whole recipe run the kernel's (system) time was a
third of the CPU time before (benchmarks/models/effnet_fmnist.md).

Example:
    >>> keep_freed_memory()      # once, at the start of a run
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit: buffers below it stay in the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept, up to 1 GiB


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False (nothing changed) off glibc or when mallopt refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
