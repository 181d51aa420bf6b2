"""Run a recipe end to end: build, fit, measure, summarize (and export when asked).

Example:
    >>> summary = train(load_recipe("recipes/digits_w4a4.yaml"))
    >>> summary["qat"]["acc"]
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import pytorch_lightning as pl
from rich.console import Console
from rich.table import Table

from qat.data.loading import validation_loaders
from qat.lightning.loggers import close_loggers
from qat.recipe import Recipe, recipe_hash
from qat.run.build import Run, build
from qat.run.evaluate import report_run
from qat.run.export import export_run


def summarize(run: Run, seconds: float) -> dict[str, Any]:
    """The run's figures: float (FP), right after quantization (PTQ) and after QAT; with evaluation domains
    (`data.args.eval_corpora`) every row also has `<metric>/<domain>` (`ppl/legal`)."""
    final = run.module.evaluate_loaders(validation_loaders(run.datamodule))
    schedule = run.schedule
    return {
        "name": run.recipe.name,
        "run_dir": str(run.run_dir),
        "recipe_hash": recipe_hash(run.recipe),
        "fp": schedule.fp_metrics or None,
        "rtn": schedule.rtn_metrics or None,
        "ptq": schedule.ptq_metrics or None,
        "qat" if schedule.quantized else "final_float": final,
        "steps": run.trainer.global_step,
        "seconds": round(seconds, 1),
        "quantized_layers": len(run.report.quantized),
        "skipped_layers": {layer.name: layer.reason for layer in run.report.skipped},
        **_kd_prune_summary(run),
    }


# The metric of the per-domain gap: perplexity (lower is better) for language models, else the cosine to the
# float embeddings (higher is better).
GAP_METRICS = {"ppl": False, "cosine": True}


def domain_gaps(summary: dict[str, Any], metric: str = "ppl") -> dict[str, dict[str, Optional[float]]]:
    """% of the round-to-nearest gap recovered, per validation domain ('' is the training text's held-out end):
    100 * (rtn - stage) / (rtn - fp) in `metric` (perplexity; or cosine) for the QAT and int4 rows (`rtn` is the
    PTQ row without GPTQ rounding); None where round-to-nearest is not worse than float or a row is missing."""
    sign = -1.0 if GAP_METRICS.get(metric, False) else 1.0  # gap > 0 when round-to-nearest is worse
    fp, rtn = summary.get("fp") or {}, summary.get("rtn") or summary.get("ptq") or {}
    gaps: dict[str, dict[str, Optional[float]]] = {}
    for key in [k for k in fp if k == metric or k.startswith(metric + "/")]:
        domain = key.partition("/")[2]
        row: dict[str, Optional[float]] = {}
        for stage in ("qat", "int4"):
            value = (summary.get(stage) or {}).get(key)
            gap = rtn.get(key, float("nan")) - fp[key]
            row[stage] = round(100.0 * (rtn[key] - value) / gap, 2) if value is not None and sign * gap > 0 else None
        gaps[domain] = row
    return gaps


def _kd_prune_summary(run: Run) -> dict[str, Any]:
    """Distillation (teacher reference) and pruning (per-layer sparsity) figures, when they are on."""
    extra: dict[str, Any] = {}
    if run.distillation is not None:
        extra["distill"] = run.distillation.state_dict()
    if run.pruning is not None:
        extra["sparsity"] = run.pruning.summary(run.model)
    return extra


def print_summary(summary: dict[str, Any], console: Optional[Console] = None) -> None:
    console = console or Console()
    table = Table(title=f"qat run '{summary['name']}'")
    stages = [key for key in ("fp", "rtn", "ptq", "qat", "final_float", "int4") if summary.get(key)]
    metrics = sorted({m for key in stages for m in summary[key]})
    table.add_column("stage")
    for metric in metrics:
        table.add_column(metric, justify="right")
    labels = {"fp": "FP (float)", "rtn": "PTQ round-to-nearest", "qat": "QAT",
              "ptq": "PTQ GPTQ" if summary.get("rtn") else "PTQ (calibrated)",
              "final_float": "float (never quantized)", "int4": "int4 export (loaded)"}
    for key in stages:
        table.add_row(labels[key], *(f"{summary[key].get(m, float('nan')):.4f}" for m in metrics))
    console.print(table)
    console.print(f"steps: {summary['steps']}  time: {summary['seconds']} s  run: {summary['run_dir']}")
    for domain, gap in (summary.get("gap_recovered_by_domain") or {}).items():
        cells = ", ".join(f"{stage} {value:.1f}%" for stage, value in gap.items() if value is not None)
        metric = next((m for m in GAP_METRICS if m in (summary.get("fp") or {})), "ppl")
        console.print(f"% of the round-to-nearest {'perplexity' if metric == 'ppl' else metric} gap recovered on "
                      f"{domain or 'the training text'}: "
                      f"{cells or 'no gap'}")
    if summary.get("sparsity"):
        sparsity = summary["sparsity"]
        console.print(f"sparsity: {sparsity['total']:.4f} ({sparsity['pattern'] or sparsity['method']}) over "
                      f"{len(sparsity['layers'])} layer(s); dense: {', '.join(sparsity['skipped']) or 'none'}")
    if summary.get("export"):
        console.print(f"int4 file: {summary['export']['path']} ({summary['export']['file_bytes']:,} bytes)")
    if summary.get("report", {}).get("path"):
        console.print(f"evaluation report: {summary['report']['path']}")


def train(recipe: Recipe, extra_callbacks: Optional[list[pl.Callback]] = None, quiet: bool = False) -> dict:
    """Train `recipe` end to end; writes `summary.json` in the run directory and returns it."""
    run = build(recipe, extra_callbacks)
    try:
        return _fit_and_measure(run, quiet)
    finally:
        close_loggers(run.trainer.loggers)  # the next run in this process starts its own wandb run


def _fit_and_measure(run: Run, quiet: bool) -> dict:
    console = Console(quiet=quiet or not run.trainer.is_global_zero)
    if not quiet and run.trainer.is_global_zero:
        print(run.report)
    start = time.perf_counter()
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.resume_from, weights_only=True)
    summary = summarize(run, time.perf_counter() - start)
    if run.recipe.export.enabled and run.schedule.quantized and run.trainer.is_global_zero:
        summary.update(export_run(run))
    for metric in GAP_METRICS:
        if any(key.startswith(metric + "/") for key in summary.get("fp") or {}):
            summary["gap_recovered_by_domain"] = domain_gaps(summary, metric)
    if run.recipe.report.enabled and run.schedule.quantized and run.trainer.is_global_zero:
        summary["report"] = report_run(run)
    if run.trainer.is_global_zero:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary, console)
    return summary
