"""Side-by-side timings of the int4 backends: `python -m qat.kernels.bench [--help]`.

Prints shape, M, backend, median time and the ratios against the dense layer and against
torch's built-in int4 op; with `--write` it also records the table with the machine and the command
in benchmarks/kernels/int4-<device>.md (`--output PATH`: there instead). `--summary` prints (and
with `--write` records) the dtype x M table of bench_summary.py instead. The options: bench_args.py. The
timing itself (interleaved calls, medians and spread, weight copies rotated past the caches)
is timing.py's.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu
from .bench_args import DEFAULT_ROWS, DESCRIPTION, SUMMARY_PATH, SUMMARY_ROWS, TABLE_PATH, add_bench_arguments
from .bench_summary import run_summary
from .dispatch import int4_linear_prepared
from .names import (
    CPU_BF16_CACHED,
    CPU_INT4PACK,
    DEQUANT,
    DEQUANT_CACHED,
    REFERENCE,
    TRITON,
    TRITON_GEMM,
    TRITON_GEMV,
)
from .progress import status, update
from .reference import dequantize_int4, int4_linear_reference
from .timing import DENSE, TORCH_DYN_QUANT, Layer, Method, copies_needed, machine_description, make_layer, time_methods

TORCH_INT4 = "torch int4 op"
NOTES_MARKER = "<!-- notes: everything below is kept when the benchmark rewrites this file -->"


def _torch_int4_method(layers: list[Layer], device: str) -> Optional[Callable[[Tensor, Layer], Tensor]]:
    """torch's own int4 op (CPU int4pack or CUDA tinygemm, bf16 compute) on forms built up front; None if absent."""
    if device == "cpu":
        for layer in layers:
            layer.weight.form(cpu.INT4PACK_FORM, cpu.build_int4pack)
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
        DEQUANT: backend(DEQUANT),
        DEQUANT_CACHED: backend(DEQUANT_CACHED),
    }
    if device == "cpu":
        methods[CPU_INT4PACK] = backend(CPU_INT4PACK)
        if dtype != torch.bfloat16:  # for bf16 x it is dequant_cached
            methods[CPU_BF16_CACHED] = backend(CPU_BF16_CACHED)
        if rows == 1:
            methods[REFERENCE] = lambda x, layer: int4_linear_reference(
                x, layer.weight.packed, layer.weight.scales, layer.weight.zeros, layer.weight.group_size)
            if hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit") and dtype == torch.float32:
                methods[TORCH_DYN_QUANT] = _dyn_quant_method(layers)
    else:
        methods.update({name: backend(name) for name in (TRITON, TRITON_GEMV, TRITON_GEMM)})
    return methods


def _dyn_quant_method(layers: list[Layer]) -> Method:
    """torch's int8-activation int4 op. Timing only: it is symmetric (ignores zero points)."""
    w = layers[0].weight
    form = torch.ops.aten._dyn_quant_pack_4bit_weight(
        w.packed, w.scales.float(), None, w.group_size, w.in_features, w.out_features)
    return lambda x, layer: torch.ops.aten._dyn_quant_matmul_4bit(
        x, form, w.group_size, w.in_features, w.out_features)


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
        update(f"timing {n}x{k}, x {str(dtype).removeprefix('torch.')}, M = {rows}")
        x = torch.randn(rows, k, generator=generator).to(device=device, dtype=dtype)
        methods = {DENSE: ((lambda x, layer: F.linear(x, layer.dense)), dense_layers)}
        methods.update({name: (method, layers) for name, method in methods_for(device, layers, rows, dtype).items()})
        if device == "cpu" and dtype == torch.float32:
            methods.update(_bf16_methods(dense_layers))
        if args.only:
            methods = {name: method for name, method in methods.items() if name in (DENSE, *args.only)}
        reps = max(3, min(args.reps, int(args.budget_flop / (2 * rows * n * k))))
        timed = time_methods(methods, x, device, args.rounds, reps)
        dense, torch_int4 = timed[DENSE], timed.get(TORCH_INT4)  # no "vs torch" column if --only drops it
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


def write_markdown(path: Path, results: list[dict], args: argparse.Namespace, device: str, seconds: float) -> None:
    """The results table with the machine and the exact command that made it."""
    command = recorded_command()
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


def recorded_command() -> str:
    """The command line this process runs, as a table records it (`qat bench ...` or `python -m ...`)."""
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:  # through the qat command
        return shlex.join(["qat", *argv])
    return shlex.join(["python", "-m", "qat.kernels.bench", *argv])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qat.kernels.bench", description=DESCRIPTION)
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Run the benchmark the options of bench_args.py ask for (`qat bench` parses them itself)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.rows = args.rows or (SUMMARY_ROWS if args.summary else DEFAULT_ROWS)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device == "cpu" else ["bfloat16", "float16"])
    args.dtypes = [getattr(torch, name) for name in dtypes]
    if device == "cpu":
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with status("int4 kernels benchmark: building the layers"):
        if args.summary:
            _write_summary(args, device, start)
            return
        print(HEADER, flush=True)
        results = [row for n, k in args.shapes for dtype in args.dtypes
                   for row in bench_shape(n, k, dtype, args, device)]
    if args.write or args.output:
        path = Path(args.output or TABLE_PATH.format(device=device))
        write_markdown(path, results, args, device, time.perf_counter() - start)
        print(f"wrote {path}")


def _write_summary(args: argparse.Namespace, device: str, start: float) -> None:
    if device != "cpu":
        raise SystemExit("--summary compares the CPU paths; run it on a CPU-only machine (or without CUDA)")
    lines = run_summary(args)
    if not (args.write or args.output):
        return
    path = Path(args.output or SUMMARY_PATH)
    command = recorded_command()
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
