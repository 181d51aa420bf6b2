"""`qat eval`: the evaluation report of a run directory, a training checkpoint or an int4 file.

    qat eval runs/digits_w2a4/version_0                       # writes report.md/json + PNGs there
    qat eval runs/.../checkpoints/last.ckpt --budget-bits 3   # plus a mixed-precision suggestion
    qat eval model.safetensors --float float.safetensors --recipe recipe.yaml -o eval/

The end of a training run with `report.enabled: true` calls `report_run` (the same code).

Example:
    >>> report, paths = evaluate("runs/digits_w2a4/version_0")
    >>> report["stages"]["ptq"]["accuracy"], report["stages"]["qat"]["accuracy"]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from qat.eval.evaluate import compare, latency
from qat.eval.float_reference import FLOAT_FILE
from qat.eval.log_report import log_report
from qat.eval.outputs import EvalError
from qat.eval.report import write_report
from qat.eval.sources import INT4_FILE, EvalSources, resolve


def _models(sources: EvalSources, train_batches: list, val_batches: list) -> dict[str, Any]:
    from qat.eval.outputs import collect
    from qat.export import load

    float_model = sources.float_model()
    recipe = sources.recipe
    collect(float_model, val_batches[:1], describe=f" ({recipe.model._target_} on {recipe.data._target_})")
    models = {"float": float_model, "ptq": sources.ptq_model(train_batches)}
    qat_model = sources.qat_model()
    if qat_model is not None:
        models["qat"] = qat_model
    models["int4"] = load(sources.int4_file(), device="cpu")
    return models


def _size(sources: EvalSources) -> dict[str, Any]:
    """Bytes of the float file and of the int4 file; `nominal_bytes`: the int4 file with its codes
    packed at their nominal width (2- and 3-bit codes are stored in 4-bit nibbles today)."""
    from qat.export import inspect_checkpoint
    from qat.export.spec import LAYOUT_INT4

    int4 = sources.int4_file()
    inspected = inspect_checkpoint(int4, verify=False)
    size = inspected.size
    saved = 0.0
    for spec in inspected.manifest.layers.values():
        if spec.weight is not None:
            weights = spec.weight.rows * spec.weight.columns
            stored_bits = 4 if spec.weight.layout == LAYOUT_INT4 else 8
            saved += weights * (stored_bits - spec.weight.bits) / 8
    float_bytes = sources.float_path.stat().st_size
    return {"float_bytes": float_bytes, "int4_bytes": size.file_bytes, "bits_per_weight": size.bits_per_weight,
            "nominal_bytes": int(size.file_bytes - saved), "ratio_vs_float": float_bytes / size.file_bytes,
            "int4_path": str(int4)}


def build_report(sources: EvalSources, noise_levels: Optional[Sequence[float]] = None, with_latency: bool = True,
                 budget_bits: Optional[float] = None, sensitivity: bool = True) -> dict[str, Any]:
    """The report dict of `sources` (see `qat.eval.evaluate.compare` for its layout)."""
    recipe = sources.recipe
    data = sources.datamodule()
    val_batches = list(data.val_dataloader())
    train_batches = list(itertools.islice(iter(data.train_dataloader()), recipe.schedule.calibration_batches))
    models = _models(sources, train_batches, val_batches)
    vocab = getattr(data, "vocab_size", None) or recipe.model.args.get("vocab_size")
    report = compare(models, val_batches, recipe.task, noise_levels, vocab)
    report.update(name=recipe.name, source=str(sources.source), float_reference=str(sources.float_path),
                  size=_size(sources))
    if with_latency:
        report["latency"] = latency(models["float"], models["int4"], val_batches[0])
    if sensitivity or budget_bits is not None:
        from qat.eval.sensitivity import DEFAULT_BITS, layer_sensitivity, quantized_layers, suggest

        rows = layer_sensitivity(recipe, models["float"], val_batches, layers=quantized_layers(models["ptq"]))
        report["sensitivity"] = {"bits_choices": list(DEFAULT_BITS), "layers": rows}
        if budget_bits is not None:
            report["sensitivity"]["suggestion"] = suggest(recipe, rows, budget_bits)
    return report


def evaluate(path: str | Path, output: Optional[str | Path] = None, float_path: Optional[str] = None,
             recipe_path: Optional[str] = None, overrides: Optional[list[str]] = None,
             **options: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """Build the report of `path` and write it to `output` (default: its run directory)."""
    sources = resolve(path, float_path, recipe_path, overrides)
    report = build_report(sources, **options)
    default_dir = sources.source if sources.source.is_dir() else \
        (sources.source.parent if sources.checkpoint is None else sources.source.parent.parent)
    return report, write_report(report, output or default_dir)


def report_run(run: Any) -> dict[str, Any]:
    """The end-of-run hook (`report.enabled`): write the report of a finished `qat.build.Run` into
    its run directory, using the trained model in memory; a short summary entry back."""
    settings, run_dir = run.recipe.report, Path(run.run_dir)
    float_path = run_dir / FLOAT_FILE
    if not float_path.is_file():  # e.g. resumed from a run made before float.safetensors existed
        message = f"no evaluation report: no float reference {float_path}"
        print(f"qat: warning: {message}", file=sys.stderr)
        return {"error": message}
    export = Path(run.recipe.export.path or run_dir / INT4_FILE)
    sources = EvalSources(run.recipe, run_dir, float_path, int4_path=export if export.is_file() else None,
                          trained=run.model)
    report = build_report(sources, settings.noise_levels, settings.latency, settings.budget_bits,
                          sensitivity=settings.budget_bits is not None)
    paths = write_report(report, run_dir)
    plots = {name: path for name, path in paths.items() if name not in ("json", "md")}
    log_report(run.trainer.loggers, report, plots, run.trainer.global_step)
    stages = report["stages"]
    brief = {stage: {k: stages[stage][k] for k in ("agreement", "kl", "correct_to_wrong") if k in stages[stage]}
             for stage in stages if stage != "float"}
    return {"path": str(paths["md"]), "vs_float": brief, "gap_recovered": report["gap_recovered"]}


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `qat eval`: 0 on success, 2 with a message naming the problem otherwise."""
    try:
        report, paths = evaluate(args.source, args.output, args.float, args.recipe, list(args.overrides),
                                 noise_levels=args.noise, with_latency=not args.no_latency,
                                 budget_bits=args.budget_bits)
    except (EvalError, ValueError, FileNotFoundError) as err:
        print(f"qat eval: error: {err}", file=sys.stderr)
        return 2
    stages = report["stages"]
    key = "perplexity" if report["task"] == "language_model" else "accuracy"
    for name, row in stages.items():
        print(f"{name:>6}: {key} {row[key]:.4f}  agreement {row['agreement']:.4f}  KL {row['kl']:.4f}  "
              f"ECE {row['ece']:.4f}")
    suggestion = report.get("sensitivity", {}).get("suggestion")
    if suggestion:
        print(f"suggested rules ({suggestion['average_bits']:.3f} bits/weight): '{suggestion['override']}'")
    print(f"report: {paths['md']}")
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `qat eval SOURCE [key=value ...]`."""
    parser = subparsers.add_parser(
        "eval", help="evaluation report: float, PTQ, QAT and int4 side by side (metrics, plots, per layer)",
        description="Compare a run's float reference, PTQ (computed on the spot), QAT and the int4 file: "
                    "task metric, agreement, flips, KL, ECE, per-class, robustness, per-layer errors, size, "
                    "latency and sensitivity; writes report.md, report.json and PNG plots.")
    parser.add_argument("source", help="a run directory, a training checkpoint (.ckpt) or a qat int4 .safetensors")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.args.batch_size=128")
    parser.add_argument("-o", "--output", help="directory for the report (default: the run directory)")
    parser.add_argument("--float", help="float reference state dict (default: <run_dir>/float.safetensors)")
    parser.add_argument("--recipe", help="recipe YAML (default: the checkpoint's or the run directory's)")
    parser.add_argument("--noise", type=float, nargs="+", help="noise levels (default: by input kind)")
    parser.add_argument("--budget-bits", type=float, help="suggest per-layer bits under this average")
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    parser.set_defaults(func=run_eval)
    return parser
