"""`qat export FILE --to TARGET -o OUT`: the converter options of `qat export`.

Example:
    $ qat export digits.safetensors --to onnx -o digits.onnx
    $ qat export lm.safetensors --to onnx -o lm.onnx --input-shape 1,16 --input-dtype int64
    $ qat export smollm2.safetensors --to onnx -o smollm2-kv.onnx --kv-cache
    $ qat export llama.safetensors --to compressed-tensors -o llama-int4/
    $ qat export smollm2.safetensors --to gguf -o smollm2-q4.gguf
"""

from __future__ import annotations

import argparse
import sys

import torch

from qat.export.targets import TARGETS, convert

INPUT_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter options on the `qat export` parser."""
    group = parser.add_argument_group("convert a qat int4 file (with --to, the positional argument is that file)")
    group.add_argument("--to", choices=sorted(TARGETS), help="target format")
    group.add_argument("--accuracy-level", type=int, default=0,
                       help="onnx: MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)")
    group.add_argument("--dequantize-unsupported", action="store_true",
                       help="onnx: store Linear layers MatMulNBits cannot hold as exact float weights "
                       "instead of failing")
    group.add_argument("--kv-cache", action="store_true",
                       help="onnx, Llama-layout causal LMs: inputs input_ids, past_keys, past_values; outputs "
                       "logits, present_keys, present_values")
    group.add_argument("--input-shape",
                       help="onnx: example input shape, e.g. 1,1,8,8 (default: the file's golden inputs)")
    group.add_argument("--vocab", help="gguf: a GGUF file to copy the tokenizer from (default: the model's own "
                       "GGUF source, if it came from one)")
    group.add_argument("--input-dtype", choices=sorted(INPUT_DTYPES), default="float32",
                       help="onnx: dtype of the example input (int64 for token ids)")


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


def run_convert(args: argparse.Namespace) -> int:
    """Handler of `qat export FILE --to TARGET`: 0 on success, 1 with a message on stderr otherwise."""
    try:
        report = convert(args.checkpoint, args.to, args.output, **_options(args))
    except (ValueError, FileNotFoundError, ImportError) as err:  # CheckpointError / ConversionError included
        print(f"qat export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    print(report)
    return 0
