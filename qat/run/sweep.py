"""`qat sweep RECIPE`: train a small grid of bits x group size x method, one table, one plot.

    qat sweep recipes/digits_w2a4.yaml --bits 2 3 4 --group-size 32 128 --method lsq observer \\
        --budget-bits 3 -o benchmarks/eval/sweep

Every setting is a full training run of the recipe with `quant.weight.*` overridden (and
its evaluation report, latency off); `--budget-bits` adds one mixed-precision setting whose
per-layer bits come from the sensitivity of the first run's float reference
(`qat.eval.sensitivity`). Writes `sweep-rows.json`, `sweep-table.md` (the table, the command
and the machine) and `sweep-pareto.png` (file size against the task metric, Pareto front marked).
While it runs, a spinner on stderr names the setting training now, and a line on stdout gives each
finished setting's int4 metric (float, PTQ and QAT beside it) and size.

Example:
    >>> rows = sweep(load_recipe("recipes/digits_w2a4.yaml"), grid([2, 4], [128], ["lsq"]), Path("out"))
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from qat.data.loading import main_validation_loader
from qat.errors import ConfigError
from qat.eval.evaluate import main_metric
from qat.eval.plots import size_plot
from qat.eval.sensitivity import layer_sensitivity, suggest
from qat.recipe import load_recipe
from qat.run.eval_sources import resolve
from qat.run.progress import stages
from qat.run.train import train
from qat.tasks import make_task

SIZE_NOTE = ("Size: 'file bytes' is the int4 file on disk, where 2- and 3-bit codes take 4-bit nibbles; "
             "'bytes at nominal bits' is that file with the codes packed at their own width (what the Pareto "
             "front and the plot use). The metric is the int4 file's, loaded back with qat.load.")
METHODS = {"lsq": ["quant.weight.quantizer=lsq"], "observer": ["quant.weight.quantizer=observer"],
           "lsq_plus": ["quant.weight.quantizer=lsq_plus", "quant.weight.symmetric=false"]}


def grid(bits: Sequence[int], group_sizes: Sequence[int], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Every (bits, group size, method) setting with its label and recipe overrides."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"--method {method!r} is not valid; allowed: {', '.join(METHODS)}")
    settings = []
    for b, g, m in itertools.product(bits, group_sizes, methods):
        overrides = [f"quant.weight.bits={b}", f"quant.weight.group_size={g}", *METHODS[m]]
        settings.append({"label": f"w{b} g{g} {m}", "bits": b, "group_size": g, "method": m, "overrides": overrides})
    return settings


def pareto_front(points: list[dict[str, Any]], metric: str, higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both size (fewer bytes) and `metric`."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, p in enumerate(points):
        dominated = any(q["bytes"] <= p["bytes"] and sign * q[metric] >= sign * p[metric]
                        and (q["bytes"] < p["bytes"] or sign * q[metric] > sign * p[metric]) for q in points)
        if not dominated:
            front.append(i)
    return front


def _run_name(setting: dict[str, Any]) -> str:
    return setting["label"].replace(" ", "_").replace("@", "at")


def run_setting(recipe_path: str, setting: dict[str, Any], extra: list[str], run_dir: Path,
                resume: bool = False) -> dict[str, Any]:
    """Train one setting (with `resume`, reuse its finished run under `run_dir`); its row of the table."""
    done = run_dir / _run_name(setting) / "version_0" / "summary.json"
    if resume and done.is_file() and "report" in json.loads(done.read_text()):
        return row_of(setting, json.loads(done.read_text()))
    overrides = [*extra, *setting["overrides"], "report.enabled=true", "report.latency=false",
                 "report.budget_bits=null", "export.enabled=true", "logging.wandb=disabled",
                 "logging.progress_bar=false", f"logging.run_dir={run_dir}", f"logging.name={_run_name(setting)}"]
    return row_of(setting, train(load_recipe(recipe_path, overrides), quiet=True))


def row_of(setting: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A setting's row from its run summary and evaluation report."""
    if "report" not in summary:  # e.g. a run shorter than the recipe's FP warm-up: no QAT, no int4 file
        raise ConfigError(f"sweep setting {setting['label']}: its run ({summary['steps']} steps, "
                          f"{summary['run_dir']}) made no evaluation report; give it more steps "
                          "(trainer.max_epochs / trainer.max_steps) or a shorter schedule.warmup_steps")
    report = json.loads(Path(summary["report"]["path"]).with_suffix(".json").read_text())
    key = report.get("metric") or main_metric(report["task"])
    stages = report["stages"]
    return {**{k: v for k, v in setting.items() if k != "overrides"}, "metric": key,
            "float": stages["float"][key], "ptq": stages["ptq"][key], "qat": stages["qat"][key],
            "int4": stages["int4"][key], "int4_agreement": stages["int4"].get("agreement"),
            "int4_kl": stages["int4"].get("kl"), "int4_ece": stages["int4"].get("ece"),
            "ptq_kl": stages["ptq"].get("kl"), "gap_recovered": report["gap_recovered"]["qat"].get(key),
            "file_bytes": report["size"]["int4_bytes"], "bytes": report["size"]["nominal_bytes"],
            "bits_per_weight": report["size"]["bits_per_weight"],
            "seconds": summary["seconds"], "run_dir": summary["run_dir"]}


def mixed_setting(first_run_dir: str, budget_bits: float) -> dict[str, Any]:
    """The mixed-precision setting suggested from the first run's float reference."""
    sources = resolve(first_run_dir)
    data = sources.datamodule()
    batches = list(main_validation_loader(data))
    rows = layer_sensitivity(sources.recipe, sources.float_model(), batches, task=make_task(sources.recipe.task))
    suggestion = suggest(sources.recipe, rows, budget_bits)
    return {"label": f"mixed@{budget_bits:g}", "bits": round(suggestion["average_bits"], 3), "group_size": "-",
            "method": "lsq", "overrides": [suggestion["override"]], "assignment": suggestion["bits"]}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]], front: list[int]) -> str:
    """The sweep as a Markdown table (Pareto-optimal settings marked)."""
    metric = rows[0]["metric"]
    head = ["setting", f"float {metric}", f"PTQ {metric}", f"QAT {metric}", f"int4 {metric}", "int4 agreement",
            "PTQ KL", "int4 KL", "int4 ECE", "PTQ gap recovered %", "file bytes", "bytes at nominal bits", "Pareto",
            "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, r in enumerate(rows):
        cells = [r["label"], r["float"], r["ptq"], r["qat"], r["int4"], r["int4_agreement"], r["ptq_kl"], r["int4_kl"],
                 r["int4_ece"], r["gap_recovered"] if r["gap_recovered"] is not None else "-",
                 f"{r['file_bytes']:,}", f"{r['bytes']:,}", "yes" if i in front else "", r["seconds"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, torch threads and versions: the line every recorded sweep carries."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, torch {torch.__version__}"


def result_line(row: dict[str, Any]) -> str:
    """A finished setting in one readable line: its int4 metric (float, PTQ, QAT beside it) and size."""
    metric = row["metric"]
    return (f"{row['label']}: int4 {metric} {row['int4']:.4f} (float {row['float']:.4f}, PTQ {row['ptq']:.4f}, "
            f"QAT {row['qat']:.4f}); {row['file_bytes']:,} bytes ({row['bytes']:,} at nominal bits); "
            f"{row['seconds']:.0f} s")


def _quiet(stage: str) -> None:
    """The default `progress` of sweep: say nothing."""


def sweep(recipe_path: str, settings: list[dict[str, Any]], out: Path, extra: Sequence[str] = (),
          budget_bits: Optional[float] = None, command: str = "", runs_dir: Optional[Path] = None,
          resume: bool = False, progress: Callable[[str], None] = _quiet) -> list[dict[str, Any]]:
    """Run every setting (and the mixed one with `budget_bits`), printing a line as each ends; write
    sweep-rows.json (every row, machine-readable), sweep-table.md and sweep-pareto.png into `out` (the
    runs themselves under `runs_dir`, default `out/runs`). `progress(stage)` is told each stage as it starts."""
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = runs_dir or out / "runs"
    total = len(settings) + (budget_bits is not None)
    rows = []
    for setting in settings:
        progress(f"[{len(rows) + 1}/{total}] training {setting['label']}")
        rows.append(run_setting(recipe_path, setting, list(extra), runs_dir, resume))
        print(f"[{len(rows)}/{total}] {result_line(rows[-1])}", flush=True)
    if budget_bits is not None:
        progress(f"[{total}/{total}] per-layer sensitivity of {rows[0]['label']}'s float reference for "
                 f"--budget-bits {budget_bits:g}")
        mixed = mixed_setting(rows[0]["run_dir"], budget_bits)
        progress(f"[{total}/{total}] training {mixed['label']}")
        rows.append({**run_setting(recipe_path, mixed, list(extra), runs_dir, resume),
                     "assignment": mixed["assignment"]})
        print(f"[{total}/{total}] {result_line(rows[-1])}", flush=True)
    progress("the table and the Pareto plot")
    higher = rows[0]["metric"] != "perplexity"
    points = [{"label": r["label"], "bytes": r["bytes"], r["metric"]: r["int4"]} for r in rows]
    front = pareto_front(points, rows[0]["metric"], higher)
    size_plot(points, rows[0]["metric"], out / "sweep-pareto.png", "size vs int4 file metric", front,
              xlabel="bytes with codes packed at their nominal width (log)")
    host = machine()
    (out / "sweep-rows.json").write_text(json.dumps({"command": command, "machine": host, "rows": rows,
                                                     "pareto": front}, indent=1))
    (out / "sweep-table.md").write_text(
        f"# Sweep\n\n```\n{command}\n```\n\nMachine: {host}.\n\n{table(rows, front)}\n\n{SIZE_NOTE}\n\n"
        "![sweep](sweep-pareto.png)\n")
    return rows


def run_sweep(args: argparse.Namespace) -> int:
    """Handler of `qat sweep`."""
    try:
        settings = grid(args.bits, args.group_size, args.method)
    except ValueError as err:
        print(f"qat sweep: error: {err}", file=sys.stderr)
        return 2
    command = "qat sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if args.command_line is None \
        else args.command_line
    with stages("qat sweep") as stage:
        rows = sweep(args.recipe, settings, Path(args.output), args.overrides, args.budget_bits, command,
                     Path(args.runs_dir) if args.runs_dir else None, args.resume, progress=stage)
    front = pareto_front([{"bytes": r["bytes"], "m": r["int4"]} for r in rows], "m", rows[0]["metric"] != "perplexity")
    print(table(rows, front))
    out = Path(args.output)
    print(f"written: {out / 'sweep-table.md'}, {out / 'sweep-rows.json'} (every row), {out / 'sweep-pareto.png'}")
    return 0
