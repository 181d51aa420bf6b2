"""qat.kernels: int4 inference kernels (this folder installs as `qat.kernels`).

Imports torch only (triton lazily, when a Triton backend first runs; csrc/ is compiled by torch's
C++ extension loader when a CPU path first needs it), and each name below on first use: a deployment can use
these without qat's training stack (Lightning, omegaconf, wandb). The folder is `kernels/`
in the source tree; the import name is `qat.kernels` so it cannot collide with the PyPI
package `kernels`.

    reference.py    the specification (slow, readable PyTorch)
    weights.py      PackedInt4Weight: one layer, checked once, kernel forms cached at load time
    names.py        the backend names (the strings backend= and $QAT_KERNEL_BACKEND take)
    cpu.py          CPU paths (torch's int4pack kernel; exact dequantize + matmul; cached bf16)
    blocked.py      CPU path for large M: tiles of rows dequantized into a reused buffer + dense GEMM
    small_m.py      CPU path for few rows: compiled AVX512-BF16 kernel, weights dequantized in registers
    gemv_f32.py     CPU path for few rows of fp32 x on AVX2: codes dequantized in registers, fp32 FMAs
    int8_act.py     CPU path with x rounded to int8 per 32 k: integer dot products (AVX512-VNNI or AVX2)
    native.py       builds and loads the compiled CPU code in csrc/ on first use (None without a compiler)
    autotune.py     measured CPU choice per (dtype, shape, M bucket), cached in-process
    triton_int4.py  fused Triton GEMV / GEMM kernels for CUDA (also run by Triton's interpreter)
    dispatch.py     int4_linear(...): picks a backend by device / M / shape; overrides; prepare_weights
    timing.py       the benchmarks' timing harness: benchmark layers, interleaved timing, machine description
    bench.py        `python -m qat.kernels.bench`: side-by-side timings (--summary: bench_summary.py)
    bench_args.py   the benchmark's options (argparse only: `qat bench --help` needs no torch)

Example:
    >>> from qat.kernels import bind, int4_linear, int4_linear_prepared, prepare_weights
    >>> y = int4_linear(x, packed, scales, zeros, group_size=128)            # tensors as stored
    >>> layer = prepare_weights(packed, scales, zeros, 128, bias=bias)       # or once at load time
    >>> y = int4_linear_prepared(x, layer)
    >>> run = bind(x, layer); y = run(x)                                    # per-token loops: checks once
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> its module, imported on first use: `import qat.kernels` alone imports nothing, so the
# benchmark's options (bench_args.py) answer `qat bench --help` without torch.
_LAZY = {**dict.fromkeys(("BACKENDS", "bind", "choose_backend", "int4_linear", "int4_linear_prepared",
                          "prepare_weights"), "dispatch"), "PackedInt4Weight": "weights"}

if TYPE_CHECKING:
    from .dispatch import BACKENDS, bind, choose_backend, int4_linear, int4_linear_prepared, prepare_weights
    from .weights import PackedInt4Weight

__all__ = ["BACKENDS", "PackedInt4Weight", "bind", "choose_backend", "int4_linear", "int4_linear_prepared",
           "prepare_weights"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
