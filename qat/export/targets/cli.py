"""`qat export FILE --to TARGET -o OUT`: running the converters (their options: qat.arguments.add_export_parser).

Example:
    $ qat export digits.safetensors --to onnx -o digits.onnx
    $ qat export lm.safetensors --to onnx -o lm.onnx --input-shape 1,16 --input-dtype int64
    $ qat export smollm2.safetensors --to onnx -o smollm2-kv.onnx --kv-cache
    $ qat export effnet.safetensors --to onnx -o effnet-int8.onnx --integer
    $ qat export llama.safetensors --to compressed-tensors -o llama-int4/
    $ qat export smollm2.safetensors --to gguf -o smollm2-q4.gguf
"""

from __future__ import annotations

import argparse
import sys

import torch

from qat.export.targets import convert

INPUT_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def _options(args: argparse.Namespace) -> dict:
    if args.to == "gguf":
        return {"vocab": args.vocab} if args.vocab else {}
    if args.to != "onnx":
        return {}
    options = {"accuracy_level": args.accuracy_level, "dequantize_unsupported": args.dequantize_unsupported}
    if args.kv_cache:
        options["kv_cache"] = True
    if args.input_shape:
        shape = [int(part) for part in args.input_shape.split(",")]
        options["example_inputs"] = (torch.zeros(shape, dtype=INPUT_DTYPES[args.input_dtype]),)
    return options


def _convert(args: argparse.Namespace):
    if not getattr(args, "integer", False):
        return convert(args.checkpoint, args.to, args.output, **_options(args))
    if args.to != "onnx" or args.kv_cache:  # the integer graph (QDQ, qat.export.targets.onnx_integer)
        raise ValueError("--integer writes an ONNX graph of integer CNN layers: use it with --to onnx, "
                         "without --kv-cache")
    from qat.export.targets.onnx_integer import export_onnx_integer

    example = _options(args).get("example_inputs")
    return export_onnx_integer(args.checkpoint, args.output, example_inputs=example)


def run_convert(args: argparse.Namespace) -> int:
    """Handler of `qat export FILE --to TARGET`: 0 on success, 1 with a message on stderr otherwise."""
    try:
        report = _convert(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # CheckpointError / ConversionError included
        print(f"qat export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    print(report)
    return 0
