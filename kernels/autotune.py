"""Pick a CPU backend by measuring: once per (dtype, layer shape, M bucket, threads) and machine.

Which of torch's int4pack kernel, the small-M kernel (small_m.py), the blocked path
(blocked.py) and, where int8 activations are allowed, the int8-activation path (int8_act.py)
is faster depends on the activation dtype, the shape, M and the machine
(benchmarks/kernels/int4-cpu-all-m.md): int4pack re-dequantizes the weight for every few rows of x,
the small-M kernel once per 64 rows (in registers, against bf16 dot products), the blocked
path once per call and then runs the dense GEMM, the int8 path never (integer products of the
codes). So the first time automatic dispatch sees a bucket of M
(powers of two: 1, 2-3, 4-7, ...) for a layer shape and dtype, it runs every candidate on
the real input (one warm-up call each, which also builds load-time forms, then
AUTOTUNE_CALLS interleaved timed calls), keeps the fastest by its fastest call, and reuses
that choice for every later call in the bucket. The choice is also written to a file per machine
(choices_file.py) that later processes read instead of measuring, so the same file gives the same
outputs from process to process. QAT_KERNEL_AUTOTUNE=0 turns measuring off:
then `static_choice` (the crossovers measured here) decides, deterministically.

Example:
    >>> name = choose_by_measurement(x, weight, [CPU_INT4PACK, CPU_BLOCKED], run)
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import choices_file
from .names import CPU_BLOCKED, CPU_GEMV_F32, CPU_INT4PACK, CPU_INT8_ACT, CPU_SMALL_M
from .weights import PackedInt4Weight

AUTOTUNE_ENV_VAR = "QAT_KERNEL_AUTOTUNE"
AUTOTUNE_CALLS = 2  # timed calls per candidate after the warm-up call
# Largest M at which the static rule keeps torch's int4pack kernel (above: the blocked path), per x dtype;
# measured crossovers, benchmarks/kernels/int4-cpu-all-m.md.
STATIC_INT4PACK_MAX_M = {torch.float32: 128, torch.bfloat16: 128, torch.float16: 128}
STATIC_SMALL_M_ROWS = range(8, 17)  # where the static rule prefers cpu_small_m (when it is a candidate)
# Up to this M the static rule prefers cpu_gemv_f32 (an AVX2 CPU's float kernel: 1.5-3x int4pack at M = 1-4 on
# SmolLM2 and 4096-wide layers, benchmarks/kernels/int4-cpu-avx2.md)
STATIC_GEMV_F32_MAX_M = 4

_CHOICES: dict[tuple, str] = {}


def autotune_enabled() -> bool:
    """False when QAT_KERNEL_AUTOTUNE is 0 / false / off (then the static rule decides)."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def rows_bucket(rows: int) -> int:
    """The power-of-two bucket of M that shares one choice: 0 for M = 0, then 1, 2-3, 4-7, ... -> 1, 2, 3, ..."""
    return rows.bit_length()


def choice_key(x: Tensor, weight: PackedInt4Weight, candidates: Sequence[str]) -> tuple:
    """What a measured choice depends on: dtype, layer shape and format, M bucket, thread count, and the candidates
    (they follow settings such as int8_act's policy)."""
    rows = x.numel() // weight.in_features
    return (x.device.type, x.dtype, weight.out_features, weight.in_features, weight.group_size,
            weight.zeros is None, rows_bucket(rows), torch.get_num_threads(), tuple(candidates))


def clear_choices() -> None:
    """Forget every measured choice (e.g. after changing the thread count or for a fresh benchmark)."""
    _CHOICES.clear()


def measured_choices() -> dict[tuple, str]:
    """A copy of the cached choices: key (see `choice_key`) -> backend name."""
    return dict(_CHOICES)


def static_choice(x: Tensor, candidates: Sequence[str]) -> str:
    """The deterministic rule: cpu_int8_act where it is a candidate (its policy allowed it: the fastest at every M
    measured here), else cpu_gemv_f32 up to STATIC_GEMV_F32_MAX_M rows, else cpu_small_m for STATIC_SMALL_M_ROWS,
    else int4pack up to STATIC_INT4PACK_MAX_M rows, else the first blocked candidate."""
    if CPU_INT8_ACT in candidates:
        return CPU_INT8_ACT
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if CPU_GEMV_F32 in candidates and rows <= STATIC_GEMV_F32_MAX_M:
        return CPU_GEMV_F32
    if CPU_SMALL_M in candidates and rows in STATIC_SMALL_M_ROWS:
        return CPU_SMALL_M
    blocked = [name for name in candidates if name.startswith(CPU_BLOCKED)]  # cpu_blocked, cpu_blocked_bf16
    if CPU_INT4PACK in candidates and (not blocked or rows <= STATIC_INT4PACK_MAX_M.get(x.dtype, 32)):
        return CPU_INT4PACK
    return blocked[0] if blocked else candidates[0]


def _fastest(x: Tensor, weight: PackedInt4Weight, candidates: Sequence[str],
             run: Callable[[str, Tensor, PackedInt4Weight], Tensor]) -> str:
    """Time each candidate (interleaved, after one warm-up call each); the one with the fastest call."""
    for name in candidates:
        run(name, x, weight)
    best = {name: float("inf") for name in candidates}
    for _ in range(AUTOTUNE_CALLS):
        for name in candidates:
            start = time.perf_counter()
            run(name, x, weight)
            best[name] = min(best[name], time.perf_counter() - start)
    return min(candidates, key=lambda name: best[name])


def choose_by_measurement(x: Tensor, weight: PackedInt4Weight, candidates: Sequence[str],
                          run: Callable[[str, Tensor, PackedInt4Weight], Tensor]) -> str:
    """The cached or newly measured fastest of `candidates` (all able to run x) for x's bucket.

    run(name, x, weight) runs one candidate. With one candidate, M = 0 or autotuning off,
    nothing is timed.
    """
    if len(candidates) == 1:
        return candidates[0]
    if not autotune_enabled() or x.numel() == 0:
        return static_choice(x, candidates)
    key = choice_key(x, weight, candidates)
    if key not in _CHOICES:
        _CHOICES[key] = _remembered_or_measured(key, x, weight, candidates, run)
    return _CHOICES[key]


def _remembered_or_measured(key: tuple, x: Tensor, weight: PackedInt4Weight, candidates: Sequence[str],
                            run: Callable[[str, Tensor, PackedInt4Weight], Tensor]) -> str:
    """The choice another process stored for this machine (choices_file.py), else a new measurement, stored."""
    path = choices_file.choices_path()
    text = choices_file.key_text(key)
    if path is not None:
        stored = choices_file.read_choices(path).get(text)
        if stored in candidates:
            return stored
    name = _fastest(x, weight, candidates, run)
    if path is not None:
        choices_file.write_choice(path, text, name)
    return name
