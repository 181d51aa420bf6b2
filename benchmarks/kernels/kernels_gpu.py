"""The Triton int4 kernels against cuBLAS bf16 on one GPU: kernel time per call, side by side in one run.

For each layer shape (N x K, int4 g128 asymmetric, fp16 scales, random codes) and each M it
times, with bf16 activations:
    cublas      F.linear on the dense bf16 weight (the float layer)
    gemv        triton_int4.linear_gemv (weights rounded to bf16 as the reference rounds them)
    gemv_unrounded  the same GEMV without that rounding (exact=False)
    gemm        triton_int4.linear_gemm (fused tensor-core GEMM)
    auto        dispatch's `triton` backend (GEMV / GEMM / dequantize + dense by M)
Times are CUDA-graph replays of many calls (no launch overhead), each call on another copy of
the weights, with enough copies that each pass reads 3x the L2 (a 8192x8192 int4 layer is 34 MiB
and would otherwise stay in the 60 MB L2 between calls); `eager` adds the launch overhead of
calling from Python, as in a plain PyTorch loop. Every method's output is checked against
cuBLAS on the same weights before it is timed.

Usage (needs CUDA and triton; writes kernels_gpu.json and the table in kernels_gpu.md beside this script,
keeping that file's notes below its marker):
    python -m benchmarks.kernels.kernels_gpu [--out kernels_gpu.json] [--shapes 8192x8192,4096x4096] [--rows 1,16,128]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from qat.kernels import dispatch, triton_int4
from qat.kernels.dispatch import prepare_weights
from qat.kernels.reference import dequantize_int4
from qat.kernels.weights import PackedInt4Weight

from benchmarks import record

GROUP_SIZE = 128
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
METHOD_MAX_M = {"cublas": 1 << 30, "gemv": 1, "gemv_unrounded": 1, "gemm": 1 << 30, "auto": 1 << 30}


def _layer(n: int, k: int, seed: int) -> PackedInt4Weight:
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(n, k // GROUP_SIZE, generator=generator) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 16, (n, k // GROUP_SIZE), dtype=torch.uint8, generator=generator)
    return prepare_weights(packed.cuda(), scales.cuda(), zeros.cuda(), GROUP_SIZE)


def _copies(layer_bytes: int, l2_bytes: int) -> int:
    return max(2, math.ceil(3 * l2_bytes / layer_bytes))


def _graph_time_us(calls: list[Callable[[], object]], replays: int = 7) -> float:
    """Median time per call of a CUDA graph that runs `calls` in order (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def _eager_time_us(calls: list[Callable[[], object]], rounds: int = 5) -> float:
    """Median time per call of calling `calls` in order from Python (launch overhead included)."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for call in calls:
            call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e6 / len(calls))
    return statistics.median(times)


def _method(name: str, x: torch.Tensor, layer: PackedInt4Weight, dense: torch.Tensor) -> Callable[[], torch.Tensor]:
    if name == "cublas":
        return lambda: F.linear(x, dense)
    if name == "gemv":
        return lambda: triton_int4.linear_gemv(x, layer, exact=True)
    if name == "gemv_unrounded":
        return lambda: triton_int4.linear_gemv(x, layer, exact=False)
    if name == "gemm":
        return lambda: triton_int4.linear_gemm(x, layer)
    return lambda: dispatch.int4_linear_prepared(x, layer, backend="triton")


def bench_shape(n: int, k: int, rows: tuple[int, ...], l2_bytes: int, log) -> list[dict]:
    layers = [_layer(n, k, seed) for seed in range(_copies(n * k // 2, l2_bytes))]
    dense = [dequantize_int4(w.packed, w.scales, w.zeros, GROUP_SIZE).to(torch.bfloat16) for w in layers[:1]]
    dense += [torch.randn_like(dense[0]) for _ in range(_copies(dense[0].numel() * 2, l2_bytes) - 1)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x, dense[0]).float()
        row = {"n": n, "k": k, "m": m}
        for name in METHOD_MAX_M:
            if m > METHOD_MAX_M[name]:
                continue
            started = time.perf_counter()
            first = _method(name, x, layers[0], dense[0])()  # autotunes on the first call
            error = ((first.float() - expected).abs().max() / expected.abs().max()).item()
            copies = dense if name == "cublas" else layers
            calls = [_method(name, x, layers[i % len(layers)], dense[i % len(dense)]) for i in
                     range(max(len(copies), 40))]
            graph_us = _graph_time_us(calls)
            eager_us = _eager_time_us(calls)
            row[name] = {"graph_us": graph_us, "eager_us": eager_us, "max_rel_error": error,
                         "tune_s": time.perf_counter() - started}
            if name == "gemv" or name == "gemm":
                launcher = triton_int4._autotuned.get(name)
                if launcher is not None and getattr(launcher, "best_config", None) is not None:
                    row[name]["config"] = str(launcher.best_config)
        for name in METHOD_MAX_M:
            if name in row and name != "cublas":
                row[name]["vs_cublas"] = row["cublas"]["graph_us"] / row[name]["graph_us"]
                row[name]["vs_cublas_eager"] = row["cublas"]["eager_us"] / row[name]["eager_us"]
        log(row)
        results.append(row)
    return results


def markdown(results: list[dict], header: str) -> str:
    names = [name for name in METHOD_MAX_M if name != "cublas"]
    lines = ["# Triton int4 kernels against cuBLAS bf16 (GPU)", "", header, "",
             "| N x K | M | cuBLAS bf16 us | " + " | ".join(names) + " | int4 GB/s (best) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for row in results:
        best = min((row[name]["graph_us"] for name in names if name in row), default=float("nan"))
        int4_bytes = row["n"] * row["k"] // 2 + 3 * row["n"] * row["k"] // GROUP_SIZE
        cells = [f"{row[name]['vs_cublas']:.2f}x" if name in row else "" for name in names]
        lines.append(f"| {row['n']}x{row['k']} | {row['m']} | {row['cublas']['graph_us']:.1f} | " + " | ".join(cells)
                     + f" | {int4_bytes / best / 1e3:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")),
                        help="JSON results; the table goes to the .md of the same name")
    parser.add_argument("--shapes", default="8192x8192,4096x4096")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = parser.parse_args(argv)
    properties = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(properties, "L2_cache_size", 60 << 20)
    import triton

    machine, command = f"{record.machine()}, triton {triton.__version__}", record.command()
    print(machine, flush=True)
    started = time.perf_counter()
    results = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        results += bench_shape(n, k, tuple(int(m) for m in args.rows.split(",")), l2_bytes,
                               lambda row: print(json.dumps(row), flush=True))
    with open(args.out, "w") as handle:
        json.dump({"machine": machine, "command": command, "results": results}, handle, indent=1)
    table = markdown(results, f"Machine: {machine}.\nCommand: `{command}` ({time.perf_counter() - started:.0f} s, "
                              f"{record.now()}).\nRatios: cuBLAS time / method time, CUDA-graph replays.")
    record.write(Path(args.out).with_suffix(".md"), table + "\n")
    print(table)


if __name__ == "__main__":
    main()
