"""The timing harness of the int4 benchmarks: benchmark layers, interleaved timing, the machine's description.

The machine may be shared: `time_methods` times each method in turn (interleaved, call by call)
and reports medians plus the spread, so noise shows up instead of hiding. Weights rotate over
several copies totalling more than the last-level cache (`copies_needed`), so every call reads
its weight from memory as a model's forward pass does (on a GPU this also flushes L2).

Used by the `qat bench` command (bench.py, bench_summary.py) and by benchmarks/ scripts.

Example:
    >>> layers = [Layer(make_layer(4096, 4096, 128, "cpu", generator)) for _ in range(copies_needed(4096 * 2048))]
    >>> timed = time_methods({"auto": (lambda x, layer: int4_linear_prepared(x, layer.weight), layers)},
    ...                      x, "cpu", rounds=5, reps=10)
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .names import DEQUANT, REFERENCE
from .reference import pack_int4
from .weights import PackedInt4Weight

ROTATION_BYTES = 160 * 2**20  # > 4x a 32 MiB L3 / 50 MiB H100 L2
DENSE = "dense"  # the method every table compares against: F.linear on the dequantized weight
TORCH_DYN_QUANT = "torch dyn_quant_4bit (int8 act)"
SLOW_METHODS = (REFERENCE, TORCH_DYN_QUANT)  # timed once per round


@dataclass
class Layer:
    """One copy of a benchmark layer in every form a method needs."""

    weight: PackedInt4Weight
    dense: Optional[Tensor] = None  # the dequantized weight in the activation dtype


Method = Callable[[Tensor, Layer], Tensor]


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    best: float  # the fastest call: what the machine does when no other process gets in the way
    spread: float  # interquartile range / median


def make_layer(n: int, k: int, group_size: int, device: str, generator: torch.Generator) -> PackedInt4Weight:
    """A random asymmetric int4 layer (N, K) with fp16 scales."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scales = torch.rand(n, k // group_size, generator=generator).mul_(0.02).add_(0.001).half()
    zeros = torch.randint(0, 16, (n, k // group_size), dtype=torch.uint8, generator=generator)
    return PackedInt4Weight(pack_int4(codes).to(device), scales.to(device), zeros.to(device), group_size)


def copies_needed(bytes_per_copy: int) -> int:
    """How many copies of a weight to rotate through so that they do not fit in the caches (2 to 32)."""
    return min(32, max(2, math.ceil(ROTATION_BYTES / bytes_per_copy)))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _call_timer(device: str) -> Callable[[Callable[[], object]], Callable[[], float]]:
    """time(fn) -> a function giving fn's seconds once the device is idle (CUDA events on a GPU)."""
    if device == "cuda":
        def time_cuda(fn: Callable[[], object]) -> Callable[[], float]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: start.elapsed_time(end) / 1e3
        return time_cuda

    def time_cpu(fn: Callable[[], object]) -> Callable[[], float]:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        return lambda: seconds
    return time_cpu


def time_methods(methods: dict[str, tuple[Method, list[Layer]]], x: Tensor, device: str, rounds: int,
                 reps: int) -> dict[str, Timing]:
    """name -> median and fastest seconds per call, and the interquartile range / median.

    Calls are interleaved one by one (method A, B, C, A, B, C, ...), so a burst of load from
    other processes hits every method alike. Each method walks its rotation of weight copies from
    its own offset, so no call finds the copy (or its kernel form) that the call before it read
    still in cache: two methods sharing a form (a forced backend and the automatic dispatch that
    picks it) once timed the second from cache (bf16 M = 1: 14x "auto" against 8x for the same kernel).
    Slow methods (SLOW_METHODS) get one call per round.
    """
    for name, (method, rotation) in methods.items():  # warm-up: builds every copy's cached forms, autotunes
        for layer in rotation[:1] if name in (*SLOW_METHODS, DEQUANT) else rotation:
            method(x, layer)
    timer = _call_timer(device)
    pending: dict[str, list[Callable[[], float]]] = {name: [] for name in methods}
    calls = dict.fromkeys(methods, 0)
    for _ in range(rounds):
        for rep in range(reps):
            for position, (name, (method, rotation)) in enumerate(methods.items()):
                if rep and name in SLOW_METHODS:
                    continue
                offset = position * max(1, len(rotation) // len(methods))  # methods walk the copies apart
                layer = rotation[(calls[name] + offset) % len(rotation)]
                calls[name] += 1
                pending[name].append(timer(lambda method=method, layer=layer: method(x, layer)))
        _synchronize(device)
    result = {}
    for name, readers in pending.items():
        samples = sorted(read() for read in readers)
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
        result[name] = Timing(median, samples[0], (quartiles[2] - quartiles[0]) / median)
    return result


def machine_description(device: str, threads: int) -> str:
    """The GPU, or the CPU model, L3, threads used (`threads`: the --threads asked for) and ATen capability."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    capability = torch.backends.cpu.get_cpu_capability()
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    model += f" ({l3.read_text().strip()} L3)" if l3.exists() else ""
    return (f"{model}, {torch.get_num_threads()} of {torch.multiprocessing.cpu_count()} threads used "
            f"(--threads {threads}), ATen CPU capability {capability}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")
