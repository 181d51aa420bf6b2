"""Command-line entry points `qat export` and `qat inspect`, registered on the main `qat` parser.

Example (in qat/cli.py):
    >>> subparsers = parser.add_subparsers(dest="command", required=True)
    >>> add_export_parser(subparsers); add_inspect_parser(subparsers)
    >>> args = parser.parse_args(); sys.exit(args.func(args))
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qat.export.format import ExportError
from qat.export.golden import golden_from_checkpoint
from qat.export.inspect import inspect_checkpoint
from qat.export.report import SizeReport
from qat.export.save import export_model
from qat.export.targets.cli import add_target_arguments, run_convert


def export_checkpoint(ckpt_path_or_run_dir: str | os.PathLike, out_path: str | os.PathLike) -> SizeReport:
    """Export a training checkpoint (a Lightning .ckpt or a run directory) to a qat int4 file.

    The model, its architecture dict and the recipe hash come from
    `qat.build.model_from_checkpoint(path) -> (prepared_model, architecture, recipe_hash)`.
    """
    source = Path(ckpt_path_or_run_dir)
    if not source.exists():
        raise FileNotFoundError(f"no checkpoint or run directory at {source}")
    try:
        from qat.build import model_from_checkpoint
    except ImportError as err:
        raise ExportError(f"qat.build.model_from_checkpoint is not available ({err}); "
                          "export from Python with qat.export_model(model, path, architecture=...)") from None
    model, architecture, recipe_hash = model_from_checkpoint(source)
    golden_inputs = golden_from_checkpoint(source)  # for `qat verify`; None when the recipe's data is unavailable
    return export_model(model, out_path, architecture=architecture, recipe_hash=recipe_hash,
                        golden_inputs=golden_inputs)


def run_export(args: argparse.Namespace) -> int:
    """Handler of `qat export`: 0 on success, 1 with a message on stderr otherwise."""
    if getattr(args, "to", None):  # `qat export FILE --to TARGET`: convert a qat file
        return run_convert(args)
    try:
        report = export_checkpoint(args.checkpoint, args.output)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError / ExportError / a non-qat checkpoint
        print(f"qat export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    print(report)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of `qat inspect`: prints the report; 0 if every check passed, 1 otherwise."""
    if not Path(args.file).is_file():
        print(f"qat inspect: error: no file at {args.file}", file=sys.stderr)
        return 1
    report = inspect_checkpoint(args.file, verify=not args.no_verify)
    print(report)
    return 0 if report.ok else 1


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `qat export <checkpoint> -o model.safetensors`."""
    parser = subparsers.add_parser(
        "export",
        help="write a deployable int4 .safetensors file from a training checkpoint",
        description="Pack the quantized weights of a training checkpoint (a .ckpt file or a run directory) "
        "into one .safetensors file that qat.load() reads (format: docs/FORMAT.md).",
    )
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt) or a run directory; with --to, a qat file")
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file (or --to target) to write")
    add_target_arguments(parser)
    parser.set_defaults(func=run_export)
    return parser


def add_inspect_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `qat inspect FILE`."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's format version, layers, sizes and integrity",
        description="Print what a qat int4 checkpoint holds and check its SHA-256 sums; exit 1 if a check fails.",
    )
    parser.add_argument("file", help="a .safetensors file written by qat export")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the payload (header checks only)")
    parser.set_defaults(func=run_inspect)
    return parser
