"""`qat eval`: the evaluation report of a run directory, a training checkpoint or an int4 file.

    qat eval runs/digits_w2a4/version_0                       # writes report.md/json + PNGs there
    qat eval runs/.../checkpoints/last.ckpt --budget-bits 3   # plus a mixed-precision suggestion
    qat eval model.safetensors --float float.safetensors --recipe recipe.yaml -o eval/

The end of a training run with `report.enabled: true` calls `report_run` (the same code, the same
settings: `qat eval` takes the recipe's `report` section as its defaults, so on a run directory it
reproduces the run's own report and rewrites it; a report with other figures goes to <run_dir>/eval/).

Example:
    >>> report, paths = evaluate("runs/digits_w2a4/version_0")
    >>> report["stages"]["ptq"]["accuracy"], report["stages"]["qat"]["accuracy"]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from qat.data.loading import calibration_loader, report_loader, validation_loaders
from qat.eval.evaluate import LM_TASKS, compare, domain_embeddings, domain_perplexity, latency
from qat.eval.log_report import log_report
from qat.eval.outputs import EvalError, collect, collect_embeddings
from qat.eval.report import write_report
from qat.eval.sensitivity import DEFAULT_BITS, layer_sensitivity, quantized_layers, suggest
from qat.export import inspect_checkpoint, load
from qat.export.spec import LAYOUT_INT4
from qat.lightning.float_reference import FLOAT_FILE
from qat.recipe import ReportConfig
from qat.run.build import unwritable_reason
from qat.run.eval_sources import INT4_FILE, EvalSources, resolve
from qat.run.progress import stages
from qat.tasks import make_task


def _check_data(model: Any, batch: Any, task: str, describe: str) -> None:
    """An `EvalError` naming the model and the data when `batch` does not fit `model`."""
    if task == "embedding":
        collect_embeddings(model, [batch], make_task(task), describe=describe)
    else:
        collect(model, [batch], describe=describe, task=make_task(task))


def _models(sources: EvalSources, train_batches: list, val_batches: list) -> dict[str, Any]:
    float_model = sources.float_model()
    _check_data(float_model, val_batches[0], sources.recipe.task, sources.describe())
    models = {"float": float_model, "ptq": sources.ptq_model(train_batches)}
    qat_model = sources.qat_model()
    if qat_model is not None:
        models["qat"] = qat_model
    models["int4"] = load(sources.int4_file(), device="cpu")
    return models


def _float_bytes(sources: EvalSources, float_model: Any) -> int:
    """The float reference's bytes: its file, or its tensors at fp32 (a pretrained model's source;
    tied tensors counted once), what a float.safetensors of it would hold."""
    if sources.float_path is not None:
        return sources.float_path.stat().st_size
    seen: dict[int, int] = {}
    for tensor in float_model.state_dict().values():
        seen.setdefault(tensor.data_ptr(), tensor.numel() * 4)
    return sum(seen.values())


def _size(sources: EvalSources, float_model: Any) -> dict[str, Any]:
    """Bytes of the float file and of the int4 file; `nominal_bytes`: the int4 file with its codes
    packed at their nominal width (2- and 3-bit codes are stored in 4-bit nibbles today)."""
    int4 = sources.int4_file()
    inspected = inspect_checkpoint(int4, verify=False)
    size = inspected.size
    saved = 0.0
    for spec in inspected.manifest.layers.values():
        if spec.weight is not None:
            weights = spec.weight.rows * spec.weight.columns
            stored_bits = 4 if spec.weight.layout == LAYOUT_INT4 else 8
            saved += weights * (stored_bits - spec.weight.bits) / 8
    float_bytes = _float_bytes(sources, float_model)
    return {"float_bytes": float_bytes, "int4_bytes": size.file_bytes, "bits_per_weight": size.bits_per_weight,
            "nominal_bytes": int(size.file_bytes - saved), "ratio_vs_float": float_bytes / size.file_bytes,
            "int4_path": str(int4)}


def _vocab_size(data: Any, recipe: Any, float_model: Any) -> Optional[int]:
    config = getattr(float_model, "config", None)
    return (getattr(data, "vocab_size", None) or recipe.model.args.get("vocab_size")
            or getattr(config, "vocab_size", None))


def _drop_token(data: Any) -> Optional[int]:
    """The token that token dropout puts in: the tokenizer's unknown token, else its padding token."""
    tokenizer = getattr(data, "tokenizer", None)
    for name in ("unk_token_id", "pad_token_id"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            return int(token)
    return None


SENSITIVITY_NOT_FOR_EMBEDDINGS = ("per-layer sensitivity ranks layers by the KL of output distributions; an "
                                  "embedding model has none (not measured)")


def _quiet(stage: str) -> None:
    """The default `progress` of build_report: say nothing."""


def build_report(sources: EvalSources, noise_levels: Optional[Sequence[float]] = None, with_latency: bool = True,
                 budget_bits: Optional[float] = None, sensitivity: bool = True,
                 progress: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """The report dict of `sources` (see `qat.eval.evaluate.compare` for its layout); `progress(stage)` is
    told each stage as it starts."""
    recipe = sources.recipe
    progress("loading the data")
    data = sources.datamodule()
    loaders = validation_loaders(data)  # '' the held-out end of the training text, then the evaluation domains
    split, held_out = report_loader(data)  # the test split where the data module has one
    val_batches = list(held_out)
    train_batches = list(itertools.islice(iter(calibration_loader(data)), recipe.schedule.calibration_batches))
    progress("loading the models: float reference, PTQ (calibrated now), QAT, int4 file")
    models = _models(sources, train_batches, val_batches)
    vocab = _vocab_size(data, recipe, models["float"])
    progress(f"comparing {', '.join(models)} on {len(val_batches)} validation batches (metrics, robustness, "
             "per-layer errors)")
    report = compare(models, val_batches, recipe.task, noise_levels, vocab, _drop_token(data),
                     class_names=getattr(data, "class_names", None),
                     robustness_examples=recipe.report.robustness_examples,
                     adversarial_eps=recipe.report.adversarial_eps,
                     adversarial_examples=recipe.report.adversarial_examples,
                     adversarial_steps=recipe.report.adversarial_steps)
    if len(loaders) > 1 and recipe.task in LM_TASKS:
        progress(f"perplexity on the evaluation domains: {', '.join(name for name in loaders if name)}")
        report["domains"] = domain_perplexity(models, {name: list(loader) for name, loader in loaders.items() if name},
                                              recipe.task, report["stages"])
    elif len(loaders) > 1 and recipe.task == "embedding":
        progress(f"cosine and nearest neighbours on the evaluation domains: {', '.join(n for n in loaders if n)}")
        report["domains"] = domain_embeddings(models, {name: list(loader) for name, loader in loaders.items() if name},
                                              recipe.task, report["stages"])
    pretrained = sources.float_path is None
    report.update(name=recipe.name, source=str(sources.source), split=split,
                  float_reference=f"{recipe.model.hf.path} (pretrained)" if pretrained else str(sources.float_path),
                  float_is=f"the pretrained model the run started from ({recipe.model.hf.path})" if pretrained
                  else f"the model at the end of FP warm-up ({sources.float_path.name})",
                  size=_size(sources, models["float"]))
    if with_latency:
        progress("measuring CPU latency, float vs int4")
        report["latency"] = latency(models["float"], models["int4"], val_batches[0], recipe.task)
    if (sensitivity or budget_bits is not None) and recipe.task == "embedding":
        report["not_applicable"]["sensitivity"] = SENSITIVITY_NOT_FOR_EMBEDDINGS
    elif sensitivity or budget_bits is not None:
        progress("per-layer sensitivity (a pass over the data per layer and bit width)")
        rows = layer_sensitivity(recipe, models["float"], val_batches, layers=quantized_layers(models["ptq"]),
                                 task=make_task(recipe.task))
        report["sensitivity"] = {"bits_choices": list(DEFAULT_BITS), "layers": rows}
        if budget_bits is not None:
            report["sensitivity"]["suggestion"] = suggest(recipe, rows, budget_bits)
    return report


def report_options(settings: ReportConfig, noise_levels: Optional[Sequence[float]] = None,
                   with_latency: Optional[bool] = None, budget_bits: Optional[float] = None,
                   sensitivity: Optional[bool] = None) -> dict[str, Any]:
    """`build_report`'s options: those given, the others from the recipe's `report` section, so that
    `qat eval RUN_DIR` makes the report the run made at its end. Sensitivity, which the end-of-run report
    computes only with a budget (it is long for a large model), is on for a run that made no report;
    `sensitivity=False` (--no-sensitivity) drops the recipe's budget too, an explicit one keeps it."""
    budget = budget_bits if budget_bits is not None or sensitivity is False else settings.budget_bits
    return {"noise_levels": settings.noise_levels if noise_levels is None else noise_levels,
            "with_latency": settings.latency if with_latency is None else with_latency,
            "budget_bits": budget,
            "sensitivity": (budget is not None or not settings.enabled) if sensitivity is None else sensitivity}


def evaluate(path: str | Path, output: Optional[str | Path] = None, float_path: Optional[str] = None,
             recipe_path: Optional[str] = None, overrides: Optional[list[str]] = None,
             progress: Callable[[str], None] = _quiet, **options: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """Build the report of `path` and write it to `output` (default: its run directory). `options`
    (`report_options`' arguments) default to the recipe's `report` settings."""
    progress(f"reading {path}")
    sources = resolve(path, float_path, recipe_path, overrides)
    if sources.recipe.trainer.cpu_threads is not None:  # the run's thread count, as its end-of-run report had:
        torch.set_num_threads(sources.recipe.trainer.cpu_threads)  # float sums split by thread differ in last bits
    default_dir = sources.source if sources.source.is_dir() else \
        (sources.source.parent if sources.checkpoint is None else sources.source.parent.parent)
    reason = unwritable_reason(Path(output) if output else default_dir)  # before minutes of work, not after
    if reason is not None:
        raise EvalError(f"cannot write the report in {output or default_dir}: {reason}; pass -o DIR for another "
                        "folder")
    report = build_report(sources, **report_options(sources.recipe.report, **options), progress=progress)
    progress("writing report.md, report.json and the plots")
    return report, write_report(report, output or _unclobbered(default_dir, report))


OTHER_REPORT_DIR = "eval"


def _unclobbered(run_dir: Path, report: dict[str, Any]) -> Path:
    """Where a report goes by default: the run directory, unless that holds a report with other figures
    (the run's own, made at the end of training, evaluated another way): that one is kept, and this one
    goes to <run_dir>/eval/ (replacing an earlier one there). A reproduction (same figures; latency is
    measured again) rewrites the run's report."""
    existing = run_dir / "report.json"
    try:
        same = not existing.exists() or _figures(json.loads(existing.read_text())) == _figures(report)
    except (OSError, ValueError):  # unreadable: not ours to overwrite
        same = False
    if same:
        return run_dir
    print(f"qat eval: {run_dir / 'report.md'} has other figures and is kept; this report goes to "
          f"{run_dir / OTHER_REPORT_DIR} (or pass -o DIR)", file=sys.stderr)
    return run_dir / OTHER_REPORT_DIR


def _figures(report: dict[str, Any]) -> str:
    """What two reports are compared on: everything as report.json holds it, but the file paths (the same
    run named another way) and the latency timings (whether latency was measured still counts); as JSON
    text, where NaN equals NaN."""
    figures = json.loads(json.dumps(report, default=str))
    for key in ("plots", "source", "float_reference"):
        figures.pop(key, None)
    figures.get("size", {}).pop("int4_path", None)
    if "latency" in figures:
        figures["latency"] = True
    return json.dumps(figures, sort_keys=True)


def report_run(run: Any) -> dict[str, Any]:
    """The end-of-run hook (`report.enabled`): write the report of a finished `qat.run.build.Run` into
    its run directory, using the trained model in memory; a short summary entry back."""
    settings, run_dir = run.recipe.report, Path(run.run_dir)
    float_path = run_dir / FLOAT_FILE
    if run.recipe.model.hf is not None and not float_path.is_file():
        float_path = None  # the float reference is the pretrained model of model.hf
    elif not float_path.is_file():  # e.g. resumed from a run made before float.safetensors existed
        message = f"no evaluation report: no float reference {float_path}"
        print(f"qat: warning: {message}", file=sys.stderr)
        return {"error": message}
    export = Path(run.recipe.export.path or run_dir / INT4_FILE)
    sources = EvalSources(run.recipe, run_dir, float_path, int4_path=export if export.is_file() else None,
                          trained=run.model, data=run.datamodule)
    report = build_report(sources, **report_options(settings))
    paths = write_report(report, run_dir)
    plots = {name: path for name, path in paths.items() if name not in ("json", "md")}
    log_report(run.trainer.loggers, report, plots, run.trainer.global_step)
    stages = report["stages"]
    brief = {stage: {k: stages[stage][k] for k in ("agreement", "kl", "correct_to_wrong", "cosine", "nn_agreement")
                     if k in stages[stage]}
             for stage in stages if stage != "float"}
    return {"path": str(paths["md"]), "vs_float": brief, "gap_recovered": report["gap_recovered"]}


SUMMARY_KEYS = ("accuracy", "perplexity", "perplexity_ratio", "cosine", "nn_agreement", "agreement", "kl", "ece")


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `qat eval`: 0 on success, 2 with a message naming the problem otherwise."""
    try:
        with stages("qat eval") as stage:
            report, paths = evaluate(args.source, args.output, args.float, args.recipe, list(args.overrides),
                                     progress=stage, noise_levels=args.noise,
                                     with_latency=False if args.no_latency else None, budget_bits=args.budget_bits,
                                     sensitivity=False if args.no_sensitivity else None)
    except (EvalError, ValueError, FileNotFoundError) as err:
        print(f"qat eval: error: {err}", file=sys.stderr)
        return 2
    for name, row in report["stages"].items():
        print(f"{name:>6}: " + "  ".join(f"{key} {row[key]:.4f}" for key in SUMMARY_KEYS if key in row))
    suggestion = report.get("sensitivity", {}).get("suggestion")
    if suggestion:
        print(f"suggested rules ({suggestion['average_bits']:.3f} bits/weight): '{suggestion['override']}'")
    print(f"report: {paths['md']}")
    return 0
