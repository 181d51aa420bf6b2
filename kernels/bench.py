"""Side-by-side timings of the int4 backends: `python -m qat.kernels.bench [--help]`.

Prints shape, M, backend, median time and the ratios against the dense layer and against
torch's built-in int4 op, then writes benchmarks/kernels-<device>.md with the machine and the
command. The machine may be shared: every round times each method in turn (interleaved) and
the table reports medians over rounds plus the spread, so noise shows up instead of hiding.
Weights rotate over several copies totalling more than the last-level cache, so every call
reads its weight from memory as a model's forward pass does (on a GPU this also flushes L2).
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu
from .dispatch import int4_linear_prepared
from .reference import dequantize_int4, int4_linear_reference, pack_int4
from .weights import PackedInt4Weight

ROTATION_BYTES = 160 * 2**20  # > 4x a 32 MiB L3 / 50 MiB H100 L2
TORCH_INT4 = "torch int4 op"
DEFAULT_ROWS, SUMMARY_ROWS = "1,4,16,64,256", "1,4,16,64,256,1024"
NOTES_MARKER = "<!-- notes: everything below is kept when the benchmark rewrites this file -->"


@dataclass
class Layer:
    """One copy of a benchmark layer in every form a method needs."""

    weight: PackedInt4Weight
    dense: Optional[Tensor] = None  # the dequantized weight in the activation dtype


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


def _torch_int4_method(layers: list[Layer], device: str) -> Optional[Callable[[Tensor, Layer], Tensor]]:
    """torch's own int4 op (CPU int4pack or CUDA tinygemm, bf16 compute) on forms built up front; None if absent."""
    if device == "cpu":
        for layer in layers:
            layer.weight.form("cpu_int4pack", cpu.build_int4pack)
        return lambda x, layer: cpu.linear_int4pack(x, layer.weight)
    forms = {}
    try:
        for layer in layers:  # CUDA tinygemm: bytes with the even k in the HIGH nibble; (K/g, N, 2) bf16
            w = layer.weight
            swapped = ((w.packed & 0x0F) << 4) | (w.packed >> 4)
            tiles = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
            offsets = (8 - w.zeros.float()) * w.scales.float()
            pairs = torch.stack((w.scales.float(), offsets), -1).transpose(0, 1).to(torch.bfloat16).contiguous()
            forms[id(layer)] = (tiles, pairs)
    except (RuntimeError, AttributeError) as error:
        print(f"torch's CUDA int4 op unavailable here ({error}); its column is left empty", file=sys.stderr)
        return None

    def run(x: Tensor, layer: Layer) -> Tensor:
        tiles, pairs = forms[id(layer)]
        return torch.ops.aten._weight_int4pack_mm(x.bfloat16(), tiles, layer.weight.group_size, pairs)

    return run


Method = Callable[[Tensor, Layer], Tensor]


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    best: float  # the fastest call: what the machine does when no other process gets in the way
    spread: float  # interquartile range / median
SLOW_METHODS = ("reference", "torch dyn_quant_4bit (int8 act)")  # timed once per round


def methods_for(device: str, layers: list[Layer], rows: int, dtype: torch.dtype) -> dict[str, Method]:
    """Name -> function(x, layer) for every method timed on this device at this M (besides dense)."""
    def backend(name: str) -> Method:
        return lambda x, layer: int4_linear_prepared(x, layer.weight, backend=name)

    methods: dict[str, Method] = {}
    torch_int4 = _torch_int4_method(layers, device)
    if torch_int4 is not None:
        methods[TORCH_INT4] = torch_int4
    methods |= {
        "auto (dispatch)": lambda x, layer: int4_linear_prepared(x, layer.weight),
        "dequant": backend("dequant"),
        "dequant_cached": backend("dequant_cached"),
    }
    if device == "cpu":
        methods["cpu_int4pack"] = backend("cpu_int4pack")
        if dtype != torch.bfloat16:  # for bf16 x it is dequant_cached
            methods["cpu_bf16_cached"] = backend("cpu_bf16_cached")
        if rows == 1:
            methods["reference"] = lambda x, layer: int4_linear_reference(
                x, layer.weight.packed, layer.weight.scales, layer.weight.zeros, layer.weight.group_size)
            if hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit") and dtype == torch.float32:
                methods["torch dyn_quant_4bit (int8 act)"] = _dyn_quant_method(layers)
    else:
        methods.update({name: backend(name) for name in ("triton", "triton_gemv", "triton_gemm")})
    return methods


def _dyn_quant_method(layers: list[Layer]) -> Method:
    """torch's int8-activation int4 op. Timing only: it is symmetric (ignores zero points)."""
    w = layers[0].weight
    form = torch.ops.aten._dyn_quant_pack_4bit_weight(
        w.packed, w.scales.float(), None, w.group_size, w.in_features, w.out_features)
    return lambda x, layer: torch.ops.aten._dyn_quant_matmul_4bit(
        x, form, w.group_size, w.in_features, w.out_features)


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
        for layer in rotation[:1] if name in (*SLOW_METHODS, "dequant") else rotation:
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


def _bf16_methods(dense_layers: list[Layer]) -> dict[str, tuple[Method, list[Layer]]]:
    """For fp32 activations: the uncached bf16 fallback a CPU dispatch could use above a crossover."""

    def dequantize_bf16(x: Tensor, layer: Layer) -> Tensor:
        w = layer.weight
        dense = cpu.dequantize_fast(w.packed, w.scales, w.zeros, w.group_size).bfloat16()
        return F.linear(x.bfloat16(), dense).float()

    return {"dequant to bf16 + bf16 matmul": (dequantize_bf16, dense_layers)}


def bench_shape(n: int, k: int, dtype: torch.dtype, args: argparse.Namespace, device: str) -> list[dict]:
    """Result rows for one (N, K) shape and activation dtype over every M in args.rows."""
    generator = torch.Generator().manual_seed(0)
    layers = [Layer(make_layer(n, k, args.group_size, device, generator)) for _ in range(copies_needed(n * k // 2))]
    dense_layers = layers[: copies_needed(n * k * dtype.itemsize)]
    for layer in dense_layers:
        w = layer.weight
        layer.dense = dequantize_int4(w.packed, w.scales, w.zeros, w.group_size).to(device=device, dtype=dtype)
    results = []
    for rows in args.rows:
        x = torch.randn(rows, k, generator=generator).to(device=device, dtype=dtype)
        methods = {"dense": ((lambda x, layer: F.linear(x, layer.dense)), dense_layers)}
        methods.update({name: (method, layers) for name, method in methods_for(device, layers, rows, dtype).items()})
        if device == "cpu" and dtype == torch.float32:
            methods.update(_bf16_methods(dense_layers))
        if args.only:
            methods = {name: method for name, method in methods.items() if name in ("dense", *args.only)}
        reps = max(3, min(args.reps, int(args.budget_flop / (2 * rows * n * k))))
        timed = time_methods(methods, x, device, args.rounds, reps)
        dense, torch_int4 = timed["dense"], timed.get(TORCH_INT4)  # no "vs torch" column if --only drops it
        for name, timing in timed.items():
            row = {"shape": f"{n}x{k}", "x": str(dtype).removeprefix("torch."), "M": rows, "method": name,
                   "ms": timing.median * 1e3, "vs_dense": dense.median / timing.median,
                   "vs_torch": torch_int4.median / timing.median if torch_int4 else None,
                   "best_ms": timing.best * 1e3, "best_vs_dense": dense.best / timing.best, "spread": timing.spread}
            results.append(row)
            print(format_row(row), flush=True)
    for layer in layers:  # free the dequantized copies the cached backends made for this dtype
        layer.weight.drop_forms()
    return results


HEADER = ("| shape (NxK) | x | M | method | median ms | vs dense | vs torch int4 op | fastest ms | vs dense (fastest) "
          "| spread (IQR) |")


def format_row(row: dict) -> str:
    vs_torch = "n/a" if row["vs_torch"] is None else f"{row['vs_torch']:.2f}x"
    cells = [row["shape"], row["x"], row["M"], row["method"], f"{row['ms']:.3f}", f"{row['vs_dense']:.2f}x", vs_torch,
             f"{row['best_ms']:.3f}", f"{row['best_vs_dense']:.2f}x", f"{row['spread'] * 100:.0f}%"]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def machine_description(device: str, threads: int) -> str:
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


def write_markdown(path: Path, results: list[dict], args: argparse.Namespace, device: str, seconds: float) -> None:
    """The results table with the machine and the exact command that made it."""
    command = shlex.join(["python", "-m", "qat.kernels.bench", *sys.argv[1:]])
    lines = [
        f"# int4 kernels on {device}",
        "",
        f"Machine: {machine_description(device, args.threads)}.",
        f"Command: `{command}` ({seconds:.0f} s, {time.strftime('%Y-%m-%d %H:%M %Z')}).",
        f"Weights int4, group size {args.group_size}, asymmetric (uint8 zeros), fp16 scales; activations x as "
        "listed. `dense` is F.linear with the weight already dequantized to x's dtype. Ratios are "
        "time(dense) / time(method) and time(torch int4 op) / time(method) for the same shape, x and M in the "
        "same run. Calls are interleaved one by one across methods; times are medians over all calls, and the "
        "fastest call (what the machine does when nothing else gets in the way); spread = interquartile range / "
        "median of the calls.",
        "",
        HEADER,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[format_row(row) for row in results],
        "",
    ]
    previous = path.read_text() if path.exists() else ""
    if NOTES_MARKER in previous:  # hand-written analysis below the marker stays
        lines.append(NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qat.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated NxK (out x in features)")
    parser.add_argument("--rows", default=None, help="comma-separated M (rows of x; default 1,4,16,64,256)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtypes", default=None, help="activation dtypes (default: float32,bfloat16 on CPU, "
                        "bfloat16,float16 on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of interleaved calls")
    parser.add_argument("--reps", type=int, default=10, help="calls per method per round (fewer for large M)")
    parser.add_argument("--budget-flop", type=float, default=2e9, help="caps calls per round: reps * 2MNK <= this")
    parser.add_argument("--only", default=None, help="comma-separated method names to time (dense is always timed)")
    parser.add_argument("--output", default=None, help="markdown file (default benchmarks/kernels-<device>.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--summary", action="store_true", help="the dtype x M table: dense vs int4pack, blocked, "
                        "auto, with peak RSS (default rows 1,4,16,64,256,1024; writes benchmarks/kernels-cpu-allM.md)")
    parser.add_argument("--no-memory", action="store_true", help="with --summary: skip the peak-RSS children")
    args = parser.parse_args(argv)
    args.rows = [int(value) for value in (args.rows or SUMMARY_ROWS if args.summary else DEFAULT_ROWS).split(",")]
    args.only = args.only.split(",") if args.only else None
    args.shapes = [tuple(int(part) for part in shape.split("x")) for shape in args.shapes.split(",")]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = args.dtypes or ("float32,bfloat16" if device == "cpu" else "bfloat16,float16")
    args.dtypes = [getattr(torch, name) for name in dtypes.split(",")]
    if device == "cpu":
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.summary:
        _write_summary(args, device, start)
        return
    print(HEADER, flush=True)
    results = [row for n, k in args.shapes for dtype in args.dtypes for row in bench_shape(n, k, dtype, args, device)]
    if not args.no_write:
        path = Path(args.output or f"benchmarks/kernels-{device}.md")
        write_markdown(path, results, args, device, time.perf_counter() - start)
        print(f"wrote {path}")


def _write_summary(args: argparse.Namespace, device: str, start: float) -> None:
    if device != "cpu":
        raise SystemExit("--summary compares the CPU paths; run it on a CPU-only machine (or without CUDA)")
    from .bench_summary import run_summary

    lines = run_summary(args)
    if args.no_write:
        return
    path = Path(args.output or "benchmarks/kernels-cpu-allM.md")
    command = shlex.join(["python", "-m", "qat.kernels.bench", *sys.argv[1:]])
    header = ["# int4 layer vs dense float at every M (cpu)", "",
              f"Machine: {machine_description(device, args.threads)}.",
              f"Command: `{command}` ({time.perf_counter() - start:.0f} s, {time.strftime('%Y-%m-%d %H:%M %Z')}).",
              "Ratios are time(dense) / time(method), medians over interleaved calls in one process (above 1: the "
              "int4 layer is faster); `dense` is F.linear on the weight dequantized to x's dtype. int4 weights, "
              f"asymmetric, fp16 scales, group size {args.group_size}.", ""]
    previous = path.read_text() if path.exists() else ""
    notes = [NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1]] if NOTES_MARKER in previous else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + lines + notes))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
