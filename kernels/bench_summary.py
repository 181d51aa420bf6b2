"""The dtype x M summary: int4 layer vs dense float of the same activation dtype, plus peak memory.

`python -m qat.kernels.bench --summary` (or `qat bench --summary`) times, interleaved in one
process, `dense` (F.linear on the weight dequantized to x's dtype), torch's int4pack kernel,
the blocked path, the small-M kernel (up to dispatch.SMALL_M_MAX_ROWS rows, where it is
available), the int8-activation path (where it is available; for every dtype, though automatic
dispatch uses it only where its policy allows: int8_act.py) and automatic dispatch for every
activation dtype and M, and prints one row per (dtype, M) with the ratios dense / method.

Peak memory: a fresh child process per (method, dtype) builds one int4 layer, resets the
kernel's peak-RSS counter (Linux /proc/self/clear_refs) after one M = 1 call (so load-time
repacks are done), runs every M and reports the growth of the peak resident set over the int4
layer (the per-call transient buffers and outputs), next to the bytes of the kernel's load-time
forms (repacked codes, float scales: kept per layer) and the size of a dense copy of the weight.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import autotune
from .dispatch import AUTO, SMALL_M_MAX_ROWS, blocked_backend, cpu_candidates, int4_linear_prepared
from .gemv_f32 import MAX_ROWS as GEMV_F32_MAX_ROWS
from .gemv_f32 import gemv_f32_unsupported
from .int8_act import int8_act_unsupported
from .names import CPU_GEMV_F32, CPU_INT4PACK, CPU_INT8_ACT, CPU_SMALL_M
from .progress import update
from .reference import dequantize_int4
from .small_m import small_m_unsupported
from .timing import DENSE, Layer, copies_needed, make_layer, time_methods
from .weights import PackedInt4Weight

SUMMARY_HEADER = ("| x | M | dense ms | int4pack | blocked | small_m | gemv_f32 | int8_act | auto (dispatch) "
                  "| auto picks | auto, fastest call | auto spread |")
COLUMNS = ("int4pack", "blocked", "small_m", "gemv_f32", "int8_act")


def summary_methods(dtype: torch.dtype) -> dict[str, Callable]:
    """name -> function(x, layer) for the summary (besides dense)."""
    def backend(name: Optional[str]) -> Callable:
        return lambda x, layer: int4_linear_prepared(x, layer.weight, backend=name)

    return {"int4pack": backend(CPU_INT4PACK), "blocked": backend(blocked_backend(dtype)),
            "small_m": backend(CPU_SMALL_M), "gemv_f32": backend(CPU_GEMV_F32), "int8_act": backend(CPU_INT8_ACT),
            "auto": backend(None)}


def _small_m_runs(x: torch.Tensor, weight: PackedInt4Weight) -> bool:
    """Whether the small-M column is timed: the kernel is available and M is within dispatch's range for it."""
    return x.shape[0] <= SMALL_M_MAX_ROWS and small_m_unsupported(x, weight) is None


def _int8_act_runs(x: torch.Tensor, weight: PackedInt4Weight) -> bool:
    return int8_act_unsupported(x, weight) is None


def _gemv_f32_runs(x: torch.Tensor, weight: PackedInt4Weight) -> bool:
    return x.shape[0] <= GEMV_F32_MAX_ROWS and gemv_f32_unsupported(x, weight) is None


# columns timed only where they can run
RUNS_HERE = {"small_m": _small_m_runs, "gemv_f32": _gemv_f32_runs, "int8_act": _int8_act_runs}


def summary_rows(n: int, k: int, dtype: torch.dtype, args: argparse.Namespace) -> list[dict]:
    """One summary row per M for this shape and activation dtype (all methods interleaved)."""
    generator = torch.Generator().manual_seed(0)
    layers = [Layer(make_layer(n, k, args.group_size, "cpu", generator)) for _ in range(copies_needed(n * k // 2))]
    dense_layers = layers[: copies_needed(n * k * dtype.itemsize)]
    for layer in dense_layers:
        w = layer.weight
        layer.dense = dequantize_int4(w.packed, w.scales, w.zeros, w.group_size).to(dtype)
    rows = []
    for m in args.rows:
        update(f"timing {n}x{k}, x {str(dtype).removeprefix('torch.')}, M = {m}")
        x = torch.randn(m, k, generator=generator).to(dtype)
        methods = {DENSE: ((lambda x, layer: F.linear(x, layer.dense)), dense_layers)}
        methods |= {name: (method, layers) for name, method in summary_methods(dtype).items()
                    if name not in RUNS_HERE or RUNS_HERE[name](x, layers[0].weight)}
        reps = max(2, min(args.reps, int(args.budget_flop / (2 * m * n * k))))
        timed = time_methods(methods, x, "cpu", args.rounds, reps)
        candidates = cpu_candidates(x, layers[0].weight)
        picked = autotune.measured_choices().get(autotune.choice_key(x, layers[0].weight, candidates), "static rule")
        dense = timed[DENSE]
        row = {"x": str(dtype).removeprefix("torch."), "M": m, "dense_ms": dense.median * 1e3, "picks": picked,
               **{name: dense.median / timed[name].median if name in timed else None
                  for name in (*COLUMNS, "auto")},
               "auto_best": dense.best / timed["auto"].best, "auto_spread": timed["auto"].spread}
        rows.append(row)
        print(format_summary_row(row), flush=True)
    for layer in layers:
        layer.weight.drop_forms()
    return rows


def format_summary_row(row: dict) -> str:
    ratios = [("n/a" if row[name] is None else f"{row[name]:.2f}x") for name in COLUMNS]
    cells = [row["x"], row["M"], f"{row['dense_ms']:.3f}", *ratios,
             f"{row['auto']:.2f}x", row["picks"], f"{row['auto_best']:.2f}x", f"{row['auto_spread'] * 100:.0f}%"]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_child(n: int, k: int, group_size: int, dtype_name: str, method: str, rows: list[int], threads: int,
               queue) -> None:
    """In a fresh process: peak RSS growth while running `method` at every M, over the int4 layer."""
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    weight: PackedInt4Weight = make_layer(n, k, group_size, "cpu", torch.Generator().manual_seed(0))
    inputs = [torch.randn(m, k).to(dtype) for m in rows]
    dense = None
    if method == DENSE:
        dense = dequantize_int4(weight.packed, weight.scales, weight.zeros, group_size).to(dtype)
    warm_up = torch.randn(1, k).to(dtype)  # load-time repacks and library start-up happen before the baseline
    if dense is None:
        int4_linear_prepared(warm_up, weight, backend=method)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident set
    baseline = _peak_rss_bytes()
    for x in inputs:
        y = F.linear(x, dense) if dense is not None else int4_linear_prepared(x, weight, backend=method)
        del y
    queue.put((_peak_rss_bytes() - baseline, _tensor_bytes(list(weight._forms.values()))))


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a form (a tensor, or tuples / lists / dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    fields = getattr(value, "__dataclass_fields__", None)
    return sum(_tensor_bytes(getattr(value, name)) for name in fields) if fields else 0


def peak_rss_growth(n: int, k: int, group_size: int, dtype: torch.dtype, method: Optional[str], rows: list[int],
                    threads: int) -> Optional[tuple[int, int]]:
    """(bytes the peak RSS grows by while `method` (None: auto) runs every M, bytes of the layer's load-time forms);
    None where Linux cannot tell."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    name = AUTO if method is None else method
    child = context.Process(target=_rss_child, args=(n, k, group_size, str(dtype)[6:], name, rows, threads, queue))
    child.start()
    try:
        return queue.get(timeout=900)
    finally:
        child.join()


def _probe_layer(n: int, k: int, group_size: int) -> PackedInt4Weight:
    return make_layer(n, k, group_size, "cpu", torch.Generator().manual_seed(0))


def memory_lines(n: int, k: int, args: argparse.Namespace) -> list[str]:
    """A markdown table of peak-RSS growth per (dtype, method) for this shape, over every M."""
    lines = ["| x | method | peak RSS growth over the int4 layer (MiB) | load-time forms (MiB) | dense weight (MiB) "
             "| int4 layer (MiB) |", "| --- | --- | --- | --- | --- | --- |"]
    int4_mib = (n * k // 2 + 3 * n * (k // args.group_size)) / 2**20
    probe = _probe_layer(1, k, args.group_size)  # one output row suffices to ask
    small_m, int8 = _small_m_runs(torch.zeros(1, k), probe), _int8_act_runs(torch.zeros(1, k), probe)
    for dtype in args.dtypes:
        for method in (DENSE, CPU_INT4PACK, blocked_backend(dtype), CPU_SMALL_M, CPU_INT8_ACT, None):
            if (method == CPU_SMALL_M and not small_m) or (method == CPU_INT8_ACT and not int8):
                continue
            update(f"peak memory {n}x{k}, x {str(dtype).removeprefix('torch.')}, {method or 'auto'} (child process)")
            measured = peak_rss_growth(n, k, args.group_size, dtype, method, args.rows, args.threads)
            shown = "n/a | n/a" if measured is None else f"{measured[0] / 2**20:.1f} | {measured[1] / 2**20:.1f}"
            lines.append(f"| {str(dtype)[6:]} | {method or 'auto (dispatch)'} | {shown} | "
                         f"{n * k * dtype.itemsize / 2**20:.0f} (held for dense) | {int4_mib:.1f} |")
            print(lines[-1], flush=True)
    return lines


def run_summary(args: argparse.Namespace) -> list[str]:
    """Print and return the markdown lines of the summary (timings, then memory) for every shape."""
    lines: list[str] = []
    for n, k in args.shapes:
        autotune.clear_choices()
        started = time.perf_counter()
        print(f"\n{n}x{k}, group {args.group_size}:\n{SUMMARY_HEADER}", flush=True)
        table = [format_summary_row(row) for dtype in args.dtypes for row in summary_rows(n, k, dtype, args)]
        lines += [f"### {n}x{k}, group {args.group_size} ({time.perf_counter() - started:.0f} s)", "",
                  SUMMARY_HEADER, "| --- " * SUMMARY_HEADER.count("|", 1) + "|", *table, ""]
        if not args.no_memory:
            lines += [*memory_lines(n, k, args), ""]
    return lines
