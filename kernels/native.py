"""Compiled CPU helpers (kernels/csrc/), built on first use with torch's C++ extension loader.

`native_module()` returns the built module, or None where it cannot be had: no C++ compiler,
a failed build (the reason is printed once, to stderr), or QAT_NATIVE=0. Callers keep their
torch-only path for None, so the package still imports and runs with torch alone (the device
image, a machine without a compiler). The build takes 1-3 minutes (2 cores) once per machine and torch
version; the library is cached under $QAT_NATIVE_BUILD_DIR (default
~/.cache/qat/native/<python>-<torch>), in a folder per version of the sources. Each use marks its
folder as used; folders of other source versions unused for `STALE_DAYS` days are deleted at the next build.

The AVX-512 path is compiled in when the CPU has AVX-512 F/BW/BF16/VNNI (`-march=native` is not
used, so a cached build never carries instructions the CPU lacks); otherwise a scalar loop. The
int8-activation kernel also has an AVX2 build (kernels/csrc/int8_act_avx2.cpp, compiled for AVX2
through a target pragma and used where the CPU reports AVX2, FMA and F16C at run time).

Example:
    >>> module = native_module()
    >>> if module is not None: module.dequantize_tile(packed, scales_f32, zeros, 128, 0, 256, out)
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

SOURCES = tuple(Path(__file__).resolve().parent / "csrc" / name
                for name in ("bindings.cpp", "dequant_tile.cpp", "small_m_bf16.cpp", "int8_act_gemm.cpp",
                             "int8_act_avx2.cpp", "fake_quant.cpp",
                             "decode_ops.cpp", "gemv_f32_avx2.cpp"))
ENV_DISABLE = "QAT_NATIVE"
ENV_BUILD_DIR = "QAT_NATIVE_BUILD_DIR"
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni")
AVX512_OPTIONS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni")
STALE_DAYS = 14
WITHOUT = "cpu_small_m and cpu_int8_act are not offered and the blocked CPU path dequantizes with torch ops (slower)."


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_flags(flags: set[str]) -> list[str]:
    """-O3 and OpenMP, plus the AVX-512 options when the CPU has every one of AVX512_FLAGS.

    -fopenmp matters: at::parallel_for is a header template whose OpenMP pragmas are compiled into the
    extension itself; without the flag it silently runs on one thread.
    """
    vector = list(AVX512_OPTIONS) if set(AVX512_FLAGS) <= flags else []
    return ["-O3", "-fopenmp", *vector]


def source_digest(flags: list[str]) -> str:
    """12 hex digits of the sources and options: each version of kernels/csrc builds in a folder of its own."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def build_directory(flags: Optional[list[str]] = None) -> Path:
    """Where the module is built: one folder per source version, so two checkouts (a worktree, an installed
    copy) never rebuild over each other's library, nor load a library built from other sources."""
    default = Path.home() / ".cache" / "qat" / "native" / f"py{platform.python_version()}-torch{torch.__version__}"
    base = Path(os.environ.get(ENV_BUILD_DIR) or default)
    return base / source_digest(compile_flags(cpu_flags()) if flags is None else flags)


def prune_stale_builds(current: Path, days: float = STALE_DAYS) -> list[Path]:
    """Delete the sibling build folders of `current` (other source versions) unused for `days` days; returns
    them. A folder's modification time marks its last use (`native_module` touches its own at every load)."""
    cutoff = time.time() - days * 86400
    removed = []
    for folder in current.parent.iterdir() if current.parent.is_dir() else ():
        if folder == current or not folder.is_dir() or folder.stat().st_mtime >= cutoff:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@functools.cache
def native_module() -> Optional[ModuleType]:
    """The compiled module, or None (disabled, no compiler, or the build failed: said once on stderr)."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print(f"qat.kernels: no C++ compiler found; {WITHOUT} Install g++ to build kernels/csrc/.", file=sys.stderr)
        return None
    from torch.utils.cpp_extension import load

    flags = compile_flags(cpu_flags())
    directory = build_directory(flags)
    directory.mkdir(parents=True, exist_ok=True)
    name = "qat_native_avx512" if "-mavx512bf16" in flags else "qat_native_scalar"
    os.utime(directory)  # marks this source version as in use (see prune_stale_builds)
    if not (directory / f"{name}.so").exists():
        prune_stale_builds(directory)
        print(f"qat.kernels: compiling the CPU kernels (kernels/csrc) into {directory}, once: 1-3 minutes",
              file=sys.stderr)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])  # the venv's ninja, unactivated
    try:
        return load(name, [str(source) for source in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    build_directory=str(directory), verbose=False)
    except Exception as error:
        print(f"qat.kernels: building kernels/csrc failed ({type(error).__name__}: {str(error)[:300]}); {WITHOUT}",
              file=sys.stderr)
        return None
    finally:
        os.environ["PATH"] = path
