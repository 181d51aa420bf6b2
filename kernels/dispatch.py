"""One entry point for int4 linear layers: picks a backend by device, M and shape.

Two ways to call it:

* tensors, as stored: ``int4_linear(x, packed, scales, zeros, group_size, bias, backend=None)``.
  Repacked forms are cached on the `packed` tensor (built on first call, rebuilt if it is
  written in place), so calling this per step costs the repack once.
* a prepared layer: ``weight = prepare_weights(packed, scales, zeros, group_size, bias=bias)``
  at load time (a weights.PackedInt4Weight), then ``int4_linear_prepared(x, weight)``;
  ``run = bind(x, weight)`` fixes the backend and checks for inputs like x once, for loops that
  call a layer per token (qat/hf/llama_decoder.py).

`backend=<name>` or the environment variable QAT_KERNEL_BACKEND=<name> forces a backend
(`auto` or unset: pick). A forced backend that cannot run these inputs raises (no silent
fallback); an unknown name raises listing the available ones. Backends (their names: names.py):

    reference       reference.py, exact, any device (slow: the specification)
    dequant         dequantize to x's dtype + dense matmul, exact (bit-identical to reference)
    dequant_cached  the same with the dequantized weight kept per layer (2-4 bytes per weight)
    cpu_int4pack    torch's CPU int4pack kernel, bf16 compute, documented tolerance
    cpu_bf16_cached bf16 matmul on a cached bf16 dequantized weight (exact for bf16 x; else bf16 compute)
    cpu_blocked     dequantize tiles of rows into a small reused buffer + dense GEMM in x's dtype (fp16 x: fp32)
    cpu_blocked_bf16 the same with a bf16 GEMM (for fp32 / fp16 x; bf16 compute, documented tolerance)
    cpu_small_m     compiled AVX512-BF16 kernel for few rows (small_m.py; needs a C++ compiler), bf16 compute
    cpu_int8_act    x rounded to int8 per block of 32 k, integer dot products with the codes (int8_act.py;
                    AVX512-VNNI or AVX2, compiled), documented error bound
    cpu_gemv_f32    compiled AVX2 kernel for few rows: codes dequantized in registers, fp32 FMAs (gemv_f32.py)
    triton          fused Triton kernels on CUDA: GEMV / GEMM / dequant+dense by M
    triton_gemv     the split-K GEMV kernel alone (any M)
    triton_gemm     the fused tensor-core GEMM kernel alone (any M)

Automatic choice: CUDA -> `triton` if importable, else `dequant`. CPU -> the fastest of
`cpu_int4pack` (when its kernel is available and the group size is a multiple of 32), the
blocked path (`cpu_blocked` for bf16 x, `cpu_blocked_bf16` for fp32 / fp16 x) and, up to
SMALL_M_MAX_ROWS rows, `cpu_small_m` (where it could be built), up to gemv_f32.MAX_ROWS rows
`cpu_gemv_f32` (AVX2 CPUs), and `cpu_int8_act` where
its policy allows int8 activations (bf16 x by default; QAT_INT8_ACTIVATIONS), measured on
the first call of each (dtype, shape, power-of-two bucket of M) and cached (autotune.py;
QAT_KERNEL_AUTOTUNE=0: a fixed crossover in M instead); `dequant` (exact) when int4pack
cannot run the layer (group size not a multiple of 32, no vectorized kernel).
Above CPU_CACHE_DENSE_ABOVE_M rows (off by default) -> `cpu_bf16_cached`. Figures:
benchmarks/kernels/int4-cpu-all-m.md. Pass backend="dequant" or "reference" for bit-exact results.

Example:
    >>> y = int4_linear(x, packed, scales, zeros, group_size=128)
    >>> y = int4_linear(x, packed, scales, zeros, group_size=128, backend="dequant")   # exact
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import autotune, blocked, cpu, gemv_f32, int8_act, small_m
from .names import (
    CPU_BF16_CACHED,
    CPU_BLOCKED,
    CPU_BLOCKED_BF16,
    CPU_GEMV_F32,
    CPU_INT4PACK,
    CPU_INT8_ACT,
    CPU_SMALL_M,
    DEQUANT,
    DEQUANT_CACHED,
    REFERENCE,
    TRITON,
    TRITON_GEMM,
    TRITON_GEMV,
)
from .reference import int4_linear_reference
from .weights import FLOAT_QPARAMS, PackedInt4Weight, cached_weight, check_activation, float_qparams

ENV_VAR = "QAT_KERNEL_BACKEND"
AUTO = "auto"
# Above this many rows of x, automatic CPU dispatch runs cpu_bf16_cached, which keeps a bf16 copy of
# the weight (2 bytes per weight, 4x the int4 form) and beats int4pack at large M (benchmarks/kernels/int4-cpu.md:
# from M ~ 8-16 with bf16 x, M ~ 16 with fp32 x). None (the default) never caches, so the int4 model's
# memory stays what it is; set it (e.g. 16) where memory allows.
CPU_CACHE_DENSE_ABOVE_M: Optional[int] = None
# Up to this many rows of x, automatic CPU dispatch also measures cpu_small_m (one pass over the weights per
# call of up to 64 rows; where compute dominates the blocked path wins: benchmarks/kernels/int4-cpu-all-m.md).
SMALL_M_MAX_ROWS = 64
MAX_AUTO_CHOICES = 256  # remembered `auto` choices per layer (one per distinct M seen; cleared when full)

RunFn = Callable[[Tensor, PackedInt4Weight, Optional[Tensor]], Tensor]


@dataclass(frozen=True)
class Backend:
    """A way to run an int4 linear layer.

    run(x, weight, bias) computes the layer; unsupported(x, weight) returns why it cannot run
    these inputs (None if it can); prepare(weight) builds its load-time form ahead of use.
    """

    name: str
    run: RunFn
    unsupported: Callable[[Tensor, PackedInt4Weight], Optional[str]]
    prepare: Callable[[PackedInt4Weight], None] = lambda weight: None
    exact: bool = False


def triton_available() -> bool:
    """Whether triton is installed (imported only when a Triton backend first runs)."""
    return importlib.util.find_spec("triton") is not None


def _triton_module():
    from . import triton_int4  # imports triton; TRITON_INTERPRET must be set before this first import

    return triton_int4


def _triton_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    if not triton_available():
        return "triton is not installed (pip install 'qat[triton]')"
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}"
    return None


def _int4pack_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    if x.device.type != "cpu":
        return f"it needs CPU tensors, got {x.device}"
    if not cpu.int4pack_available():
        return "this torch build or CPU has no vectorized int4pack kernel"
    if cpu.int4pack_kernel_group_size(weight.group_size) is None:
        return f"it needs a group size divisible by 32, got {weight.group_size}"
    return None


def _cpu_only(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    return None if x.device.type == "cpu" else f"it needs CPU tensors, got {x.device}"


def _blocked_unsupported(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    if x.device.type != "cpu" or weight.packed.device.type != "cpu":
        return f"it needs CPU tensors, got {x.device}"
    if weight.group_size % 2:
        return f"it needs an even group size, got {weight.group_size}"
    return None


def _anywhere(x: Tensor, weight: PackedInt4Weight) -> Optional[str]:
    return None


def _reference(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor]) -> Tensor:
    return int4_linear_reference(x, weight.packed, weight.scales, weight.zeros, weight.group_size, bias)


def _triton_backend(name: str, function: str) -> Backend:
    def run(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor]) -> Tensor:
        return getattr(_triton_module(), function)(x, weight, bias)

    return Backend(name, run, _triton_unsupported)


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend(REFERENCE, _reference, _anywhere, exact=True),
        Backend(DEQUANT, lambda x, w, b: cpu.linear_dequantized(x, w, b, cache=False), _anywhere, exact=True),
        Backend(DEQUANT_CACHED, lambda x, w, b: cpu.linear_dequantized(x, w, b, cache=True), _anywhere, exact=True),
        Backend(CPU_BF16_CACHED, cpu.linear_bf16_cached, _cpu_only),
        Backend(CPU_BLOCKED, blocked.linear_blocked, _blocked_unsupported),
        Backend(
            CPU_BLOCKED_BF16,
            lambda x, w, b: blocked.linear_blocked(x, w, b, compute_dtype=torch.bfloat16),
            _blocked_unsupported,
        ),
        Backend(CPU_SMALL_M, small_m.linear_small_m, small_m.small_m_unsupported,
                prepare=lambda w: w.form(FLOAT_QPARAMS, float_qparams)),
        Backend(CPU_INT8_ACT, int8_act.linear_int8_act, int8_act.int8_act_unsupported,
                prepare=lambda w: w.form(int8_act.FORM, int8_act.vnni_form)),
        Backend(CPU_GEMV_F32, gemv_f32.linear_gemv_f32, gemv_f32.gemv_f32_unsupported,
                prepare=lambda w: w.form(int8_act.FORM, int8_act.vnni_form)),
        Backend(
            CPU_INT4PACK,
            cpu.linear_int4pack,
            _int4pack_unsupported,
            prepare=lambda w: w.form(cpu.INT4PACK_FORM, cpu.build_int4pack),
        ),
        _triton_backend(TRITON, "linear_auto"),
        _triton_backend(TRITON_GEMV, "linear_gemv"),
        _triton_backend(TRITON_GEMM, "linear_gemm"),
    )
}


def get_backend(name: str) -> Backend:
    """The backend called `name`; a ValueError listing the available ones if there is none."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown int4 kernel backend {name!r} (from backend= or ${ENV_VAR}); "
            f"available: {', '.join([AUTO, *sorted(BACKENDS)])}"
        )
    return BACKENDS[name]


def prepare_weights(
    packed: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    group_size: int,
    backend: Optional[str] = None,
    bias: Optional[Tensor] = None,
) -> PackedInt4Weight:
    """Check the layout once and, if `backend` is named, build that backend's load-time form now.

    Call at load time; keep the returned weight with the layer and run it with `int4_linear_prepared`.
    """
    weight = PackedInt4Weight(packed, scales, zeros, group_size, bias)
    if backend is not None:
        get_backend(backend).prepare(weight)
    return weight


def blocked_backend(dtype: torch.dtype) -> str:
    """The blocked backend automatic dispatch considers for activations of this dtype."""
    return CPU_BLOCKED if dtype == torch.bfloat16 else CPU_BLOCKED_BF16


def cpu_candidates(x: Tensor, weight: PackedInt4Weight) -> list[str]:
    """The CPU backends automatic dispatch measures for these inputs (each able to run them; may be empty)."""
    if BACKENDS[CPU_INT4PACK].unsupported(x, weight) is not None:
        return []  # layers int4pack cannot run keep the exact `dequant` path (as before the blocked path)
    names = (CPU_INT4PACK, blocked_backend(x.dtype))
    if x.numel() // weight.in_features <= SMALL_M_MAX_ROWS:
        names += (CPU_SMALL_M,)
    if x.numel() // weight.in_features <= gemv_f32.MAX_ROWS:
        names += (CPU_GEMV_F32,)
    if int8_act.allowed_for(x.dtype):
        names += (CPU_INT8_ACT,)
    return [name for name in names if BACKENDS[name].unsupported(x, weight) is None]


def _run_unchecked(name: str, x: Tensor, weight: PackedInt4Weight) -> Tensor:
    return BACKENDS[name].run(x, weight, None)


def choose_backend(x: Tensor, weight: PackedInt4Weight) -> str:
    """The backend name for these inputs: the fastest one that can run them (see module docstring).

    On CPU this may time the candidates on x once per (dtype, shape, M bucket): see autotune.py.
    """
    if x.device.type == "cuda":
        return TRITON if _triton_unsupported(x, weight) is None else DEQUANT
    if x.device.type != "cpu":
        return DEQUANT
    rows = x.numel() // weight.in_features
    if CPU_CACHE_DENSE_ABOVE_M is not None and rows > CPU_CACHE_DENSE_ABOVE_M:
        return CPU_BF16_CACHED
    candidates = cpu_candidates(x, weight)
    if not candidates:
        return DEQUANT
    return autotune.choose_by_measurement(x, weight, candidates, _run_unchecked)


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: the argument, else $QAT_KERNEL_BACKEND, else `auto`."""
    return backend or os.environ.get(ENV_VAR) or AUTO


def _checked(x: Tensor, weight: PackedInt4Weight, name: str) -> Backend:
    """The backend `name`, or a ValueError saying why it cannot run these inputs."""
    chosen = get_backend(name)
    reason = chosen.unsupported(x, weight)
    if reason is not None:
        raise ValueError(f"int4 kernel backend {name!r} cannot run this layer: {reason}")
    return chosen


def _run(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    check_activation(x, weight.in_features, bias, weight.out_features)
    name = requested_backend(backend)
    key = None
    if name == AUTO:
        key = (x.dtype, x.device, x.numel() // weight.in_features, CPU_CACHE_DENSE_ABOVE_M,
               autotune.autotune_enabled(), int8_act.policy())
        cached = weight.auto_choices.get(key)
        if cached is not None:
            return BACKENDS[cached].run(x, weight, bias)  # checked when it was chosen
        name = choose_backend(x, weight)
    chosen = _checked(x, weight, name)
    if key is not None:
        if len(weight.auto_choices) >= MAX_AUTO_CHOICES:
            weight.auto_choices.clear()
        weight.auto_choices[key] = name
    return chosen.run(x, weight, bias)


def bind(x: Tensor, weight: PackedInt4Weight, backend: Optional[str] = None) -> Callable[[Tensor], Tensor]:
    """`int4_linear_prepared(·, weight, backend)` for inputs like `x`, with the choice and checks done now.

    For loops that call one layer many times with the same input dtype, device and row count (a decode
    step): each call then skips the checks, the environment lookup and the backend choice. The weights
    must not be written while the bound function is in use; inputs unlike `x` (in dtype, device, rows,
    or, when x is a contiguous 2-D tensor, in being one) need a new `bind`.
    """
    check_activation(x, weight.in_features, weight.bias, weight.out_features)
    name = requested_backend(backend)
    if name == AUTO:
        name = choose_backend(x, weight)
    run, bias = _checked(x, weight, name).run, weight.bias
    if name == CPU_INT4PACK:
        return cpu.int4pack_bound(weight, bias, plain_rows=x.dim() == 2 and x.is_contiguous())
    float_rows = x.dim() == 2 and x.is_contiguous() and x.dtype == torch.float32
    if name == CPU_INT8_ACT:
        return int8_act.int8_act_bound(weight, bias, plain_rows=float_rows)
    if name == CPU_GEMV_F32:
        return gemv_f32.gemv_f32_bound(weight, bias, plain_rows=float_rows)
    return lambda inputs: run(inputs, weight, bias)


def int4_linear_prepared(x: Tensor, weight: PackedInt4Weight, backend: Optional[str] = None) -> Tensor:
    """y = x @ W.T + weight.bias for a prepared layer (`prepare_weights`, or a PackedInt4Weight made directly)."""
    return _run(x, weight, weight.bias, backend)


def int4_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    group_size: int,
    bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """y = x @ W.T + bias for int4 weights in the canonical layout (see reference.py).

    x (..., K) -> (..., N) in x's dtype. Forms a backend needs (e.g. cpu_int4pack's tiles) are
    cached on `packed` and reused while the same packed/scales/zeros tensor objects come back:
    pass the stored buffers themselves, not fresh views or casts, or the repack runs every call.
    """
    return _run(x, cached_weight(packed, scales, zeros, group_size), bias, backend)
