"""The options of the kernel benchmark (`python -m qat.kernels.bench`, `qat bench`): argparse only, so that
`qat bench --help` answers without importing torch. bench.py runs what they ask for.

Example:
    >>> parser = argparse.ArgumentParser(description=DESCRIPTION)
    >>> add_bench_arguments(parser)
    >>> parser.parse_args(["--shapes", "64x128", "--rows", "1,4"]).shapes
    [(64, 128)]
"""

from __future__ import annotations

import argparse

DESCRIPTION = ("Time the int4 backends side by side against the dense layer and torch's int4 op; prints the table "
               "(--summary: the dtype x M table with peak memory) and writes it only with --write or --output.")
DEFAULT_ROWS, SUMMARY_ROWS = [1, 4, 16, 64, 256], [1, 4, 16, 64, 256, 1024]
# Where --write puts the tables: the records tracked under benchmarks/ (hand-written notes below the marker stay).
TABLE_PATH, SUMMARY_PATH = "benchmarks/kernels/int4-{device}.md", "benchmarks/kernels/int4-cpu-all-m.md"


def int_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]."""
    return [int(part) for part in text.split(",")]


def name_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']."""
    return text.split(",")


def shape_list(text: str) -> list[tuple[int, int]]:
    """'4096x4096,11008x4096' -> [(4096, 4096), (11008, 4096)]."""
    try:
        return [(int(n), int(k)) for n, _, k in (shape.partition("x") for shape in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of NxK shapes like 4096x4096,11008x4096") from None


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options on `parser`."""
    parser.add_argument("--shapes", type=shape_list, default="4096x4096,11008x4096",
                        help="comma-separated NxK (out x in features; default: 4096x4096,11008x4096)")
    parser.add_argument("--rows", type=int_list, default=None,
                        help="comma-separated M (rows of x; default: 1,4,16,64,256, with --summary 1,4,16,64,256,1024)")
    parser.add_argument("--group-size", type=int, default=128, help="inputs per scale (default: 128)")
    parser.add_argument("--dtypes", type=name_list, default=None,
                        help="activation dtypes (default: float32,bfloat16 on CPU, bfloat16,float16 on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default: 2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of interleaved calls (default: 5)")
    parser.add_argument("--reps", type=int, default=10,
                        help="calls per method per round (default: 10; fewer for large M)")
    parser.add_argument("--budget-flop", type=float, default=2e9,
                        help="caps calls per round: reps * 2MNK <= this (default: 2e9)")
    parser.add_argument("--only", type=name_list, default=None,
                        help="comma-separated method names to time (dense is always timed)")
    parser.add_argument("--write", action="store_true",
                        help=f"write the table to its record under benchmarks/: {TABLE_PATH}, with --summary "
                        f"{SUMMARY_PATH} (hand-written notes below the notes marker are kept)")
    parser.add_argument("--output", help="write the table to this markdown file instead (implies --write)")
    parser.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)  # the old default; a no-op
    parser.add_argument("--summary", action="store_true",
                        help="the dtype x M table: dense vs int4pack, blocked, small_m, int8_act and auto, "
                        "with peak RSS")
    parser.add_argument("--no-memory", action="store_true", help="with --summary: skip the peak-RSS children")
