"""The arguments of every `qat` subcommand, with their help: argparse only, so that `qat --help` and
`qat COMMAND --help` import nothing heavy (no torch, Lightning, omegaconf or transformers).

Each `add_<command>_parser(subparsers)` registers one subcommand and returns its parser; `qat.cli`
attaches the handler, which imports the module implementing the command only when it runs. The choice
lists below name what those modules define (tests/qat/test_cli.py checks that they agree).

Example:
    >>> parser = argparse.ArgumentParser(prog="qat")
    >>> add_eval_parser(parser.add_subparsers(dest="command")).set_defaults(func=handler)
"""

from __future__ import annotations

import argparse

from qat.kernels.bench_args import DESCRIPTION as BENCH_DESCRIPTION
from qat.kernels.bench_args import add_bench_arguments

DEFAULT_RECIPE = "recipes/digits_w2a4.yaml"
EXPORT_TARGETS = ("compressed-tensors", "gguf", "onnx")  # qat.export.targets.TARGETS
INPUT_DTYPES = ("float32", "int32", "int64")  # qat.export.targets.cli.INPUT_DTYPES
SWEEP_METHODS = ("lsq", "observer", "lsq_plus")  # qat.run.sweep.METHODS
GENERATE_ENGINES = ("auto", "qat", "hf")  # qat.hf.generate.ENGINES

Subparsers = argparse._SubParsersAction


def add_train_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat train [RECIPE.yaml] [key=value ...]`."""
    parser = subparsers.add_parser("train", help="run a recipe: qat train [RECIPE.yaml] [key=value ...]",
                                   description="Train a recipe end to end: FP warm-up, calibration, QAT, export "
                                   "of the int4 file and the evaluation report, all in one run directory.")
    parser.add_argument("recipe", nargs="?", help=f"recipe YAML (default: {DEFAULT_RECIPE})")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optimizer.lr=1e-3")
    return parser


def add_export_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat export CHECKPOINT -o model.safetensors` and `qat export FILE --to TARGET -o OUT`."""
    parser = subparsers.add_parser(
        "export",
        help="write a deployable int4 .safetensors file from a training checkpoint",
        description="Pack the quantized weights of a training checkpoint (a .ckpt file or a run directory) "
        "into one .safetensors file that qat.load() reads (format: docs/FORMAT.md).",
    )
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt) or a run directory; with --to, a qat file")
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file (or --to target) to write")
    group = parser.add_argument_group("convert a qat int4 file (with --to, the positional argument is that file)")
    group.add_argument("--to", choices=EXPORT_TARGETS, help="target format")
    group.add_argument("--accuracy-level", type=int, default=0,
                       help="onnx: MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)")
    group.add_argument("--dequantize-unsupported", action="store_true",
                       help="onnx: store Linear layers MatMulNBits cannot hold as exact float weights "
                       "instead of failing")
    group.add_argument("--kv-cache", action="store_true",
                       help="onnx, Llama-layout causal LMs: inputs input_ids, past_keys, past_values; outputs "
                       "logits, present_keys, present_values")
    group.add_argument("--integer", action="store_true",
                       help="onnx: an integer QDQ graph (QLinearConv, QLinearAdd, ...) of a CNN file with per-channel "
                       "weights and a QuantPoint before every layer (qat.export.targets.onnx_integer)")
    group.add_argument("--input-shape",
                       help="onnx: example input shape, e.g. 1,1,8,8 (default: the file's golden inputs)")
    group.add_argument("--vocab", help="gguf: a GGUF file to copy the tokenizer from (default: the model's own "
                       "GGUF source, if it came from one)")
    group.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float32",
                       help="onnx: dtype of the example input (int64 for token ids)")
    return parser


def add_inspect_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat inspect PATH`."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's format version, layers, sizes and integrity",
        description="Print what a qat int4 file holds and check its SHA-256 sums; exit 1 if a check fails. "
        "A run directory shows its model.safetensors; an .onnx file written by qat export --to onnx shows "
        "the metadata qat wrote, its MatMulNBits nodes and its sizes.",
    )
    parser.add_argument("file", help="a .safetensors file written by qat export, a run directory or an .onnx file")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading the payload (header checks only; for an .onnx file, the ONNX checker)")
    return parser


def add_verify_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat verify FILE [--backend NAME] [--tolerance X]`."""
    parser = subparsers.add_parser(
        "verify", help="rerun a file's golden inputs here and check the outputs",
        description="Load a qat file (or run a converted .onnx file), rerun the golden inputs stored at export, "
        "report the largest deviation; exit 1 past the tolerance or for a corrupted file.")
    parser.add_argument("file", help="a qat .safetensors file, a run directory (its int4 file) or an .onnx file "
                        "written by qat export --to onnx")
    parser.add_argument("--backend", help="kernel backend for qat files (reference, dequant, cpu_int4pack, ...)")
    parser.add_argument("--tolerance", type=float, help="largest allowed deviation relative to max |golden output|")
    return parser


def add_eval_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat eval SOURCE [key=value ...]`."""
    parser = subparsers.add_parser(
        "eval", help="evaluation report: float, PTQ, QAT and int4 side by side (metrics, plots, per layer)",
        description="Compare a run's float reference, PTQ (computed on the spot), QAT and the int4 file: "
                    "task metric, agreement, flips, KL, ECE, per-class, robustness, per-layer errors, size, "
                    "latency and sensitivity; writes report.md, report.json and PNG plots.")
    parser.add_argument("source", help="a run directory, a training checkpoint (.ckpt) or a qat int4 .safetensors")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.args.batch_size=128")
    parser.add_argument("-o", "--output", help="directory for the report (default: the run directory, or its "
                        "eval/ when the run's own report there has other figures: that one is kept)")
    parser.add_argument("--float", help="float reference state dict (default: <run_dir>/float.safetensors)")
    parser.add_argument("--recipe", help="recipe YAML (default: the checkpoint's or the run directory's)")
    parser.add_argument("--noise", type=float, nargs="+",
                        help="noise levels (default: the recipe's report.noise_levels, else by input kind)")
    parser.add_argument("--budget-bits", type=float,
                        help="suggest per-layer bits under this average (default: the recipe's report.budget_bits)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the CPU latency measurement (default: as the recipe's report.latency)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip per-layer sensitivity (one pass over the data per layer and bit width: long "
                             "for a large language model), the recipe's report.budget_bits too; --budget-bits "
                             "still computes it")
    return parser


def add_sweep_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat sweep RECIPE [key=value ...] --bits ... --group-size ... --method ...`."""
    parser = subparsers.add_parser("sweep", help="train a grid of bits x group size x method; table + Pareto plot",
                                   description="Train a small grid of bits x group size x method, one table, "
                                   "one plot (sweep-table.md, sweep-rows.json, sweep-pareto.png).")
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. trainer.max_epochs=10")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4], help="weight bits (default: 2 4)")
    parser.add_argument("--group-size", type=int, nargs="+", default=[128], help="group sizes (default: 128)")
    parser.add_argument("--method", nargs="+", default=["lsq"],
                        help=f"weight quantizers: {', '.join(SWEEP_METHODS)} (default: lsq)")
    parser.add_argument("--budget-bits", type=float, help="add the mixed-precision setting for this average")
    parser.add_argument("-o", "--output", default="runs/sweep", help="where the table, plot and runs go "
                        "(default: runs/sweep)")
    parser.add_argument("--runs-dir", help="where the training runs go (default: OUTPUT/runs)")
    parser.add_argument("--resume", action="store_true", help="reuse settings whose run already finished")
    parser.add_argument("--command-line", help=argparse.SUPPRESS)  # the command recorded in the table
    return parser


def add_generate_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat generate FILE PROMPT`."""
    parser = subparsers.add_parser("generate", help="generate text from an int4 causal LM file",
                                   description="Load an int4 file written by qat export and continue a prompt "
                                   "(greedy, or sampling with --sample), with a KV cache.")
    parser.add_argument("file", help="a .safetensors file of a Hugging Face causal LM written by qat")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="with --sample: softmax temperature (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="with --sample: keep the k most likely tokens (default: 50; 0 keeps all)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="with --sample: keep the most likely tokens up to this total probability "
                        "(default: 0.95; 1 keeps all)")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: random seed (default: 0)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the source recorded in the file)")
    parser.add_argument("--backend", help="int4 kernel backend (default: dispatch chooses)")
    parser.add_argument("--engine", choices=GENERATE_ENGINES, default="auto",
                        help="qat: the lean Llama decoder; hf: Hugging Face generate; auto: qat where it applies")
    return parser


def add_bench_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat bench [options]`: the options of `python -m qat.kernels.bench` (kernels/bench_args.py)."""
    parser = subparsers.add_parser("bench", help="time the int4 kernels side by side (python -m qat.kernels.bench)",
                                   description=BENCH_DESCRIPTION)
    add_bench_arguments(parser)
    return parser


def add_monitor_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """`qat monitor FILE DATA [--clean CLEAN] [--window N] ...` (qat.run.monitor)."""
    parser = subparsers.add_parser(
        "monitor", help="estimate accuracy without labels and test production inputs for drift against the file's "
                        "calibration profile (no float model)",
        description="Run DATA through a qat file, estimate its accuracy without labels (by default the validation "
                    "accuracy minus the drop of the mean confidence, DoC; fit on labelled validation data at export) "
                    "and compare "
                    "clip rates, activation histograms and output confidence / entropy with the calibration profile "
                    "stored at export; prints the alerts, the estimated accuracy and the layers that moved. Exit 0: "
                    "no alert, 1: an alert (by default an estimated accuracy drop; drift for a profile without the "
                    "estimate), 2: error.")
    parser.add_argument("file", help="a qat .safetensors file or a run directory (its model.safetensors)")
    parser.add_argument("data", help="model inputs: a .pt / .npy / .npz tensor file, or a recipe .yaml (its data "
                        "module's test split, else validation)")
    parser.add_argument("--clean", help="clean in-distribution inputs (same forms) to build the profile from, for "
                        "a file exported without one")
    parser.add_argument("--window", type=int, default=500, help="samples per test window (default 500)")
    parser.add_argument("--min-samples", type=int, default=100, help="no alert before this many (default 100)")
    parser.add_argument("--false-alarm", type=float, default=1e-3,
                        help="false-alarm probability per check of the drift test (Bonferroni over all features) "
                             "and of the accuracy test (one-sided; default 1e-3)")
    parser.add_argument("--min-shift", type=float, default=0.02,
                        help="least move of a histogram share / clip rate that alerts (default 0.02)")
    parser.add_argument("--check-every", type=int, default=128, help="test once this many samples are pending "
                        "(default 128)")
    parser.add_argument("--sample-every", type=int, default=1, help="look at every k-th sample only (default 1)")
    parser.add_argument("--alert-on-input", action="store_true",
                        help="let the quantizers of the model's input alert too (default: reported only)")
    parser.add_argument("--alert-on", choices=("auto", "accuracy", "drift", "both"), default="auto",
                        help="what alerts: an estimated accuracy drop, drift, or both (default auto: accuracy when "
                             "the profile holds the estimate, else drift; drift is otherwise reported as a warning)")
    parser.add_argument("--min-accuracy-drop", type=float, default=0.02,
                        help="least estimated accuracy drop that alerts, as a fraction (default 0.02 = 2 points)")
    parser.add_argument("--estimator", choices=("doc", "atc_mc", "atc_ne"), default="doc",
                        help="label-free accuracy estimator: difference of confidences (default), or ATC with the "
                             "max softmax / negative entropy score")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward (default 64)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser
