"""PNG plots of an evaluation report (matplotlib, Agg backend: no display needed).

Each function takes the report dict (or sweep rows) and a path, draws one figure and
returns the path; `write_all` draws every plot the report has data for.

Example:
    >>> write_all(report, Path("runs/x/version_0"))   # {'layers': .../layers.png, ...}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from qat.eval.evaluate import main_metric

ROBUSTNESS_LABELS = {"cosine": "cosine to the float embeddings of the clean input"}
STAGE_COLORS = {"float": "#444444", "ptq": "#d62728", "qat": "#1f77b4", "int4": "#2ca02c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _finite(value: float, cap: float = 100.0) -> float:
    return cap if math.isinf(value) else value


def _grouped_bars(ax: Any, categories: list[str], series: list[tuple[str, dict, str, float]], **ticks: Any) -> None:
    """One group of bars per category, one bar per (label, {category: value}, stage, alpha) series
    (a missing value draws 0); the tick sits under the middle of each group."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values, stage, alpha) in enumerate(series):
        ax.bar([j + i * width for j in range(len(categories))], [values.get(c, 0.0) for c in categories], width,
               label=label, color=STAGE_COLORS.get(stage), alpha=alpha)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))], categories, **ticks)


def layers_plot(report: dict, path: Path) -> Path:
    """Bars: weight SQNR and per-layer output SQNR of each quantized stage (dB)."""
    plt = _pyplot()
    layers = report["layers"]
    names = sorted({r["layer"] for rows in layers["output_error"].values() for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 3), 4))
    series = [(f"{s} weight", {r["layer"]: r["weight_sqnr_db"] for r in rows}, s)
              for s, rows in layers["weight_sqnr"].items()]
    series += [(f"{s} output", {r["layer"]: r["output_sqnr_db"] for r in rows}, s)
               for s, rows in layers["output_error"].items()]
    bars = [(label, {n: _finite(v) for n, v in values.items()}, stage, 0.5 if "weight" in label else 1.0)
            for label, values, stage in series]
    _grouped_bars(ax, names, bars, rotation=30, ha="right")
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.set_title("per-layer SQNR vs float")
    ax.legend(fontsize=7)
    return _save(fig, path)


def slices_plot(report: dict, path: Path) -> Path:
    """Grouped bars: per-class accuracy of each stage."""
    plt = _pyplot()
    slices = report["slices"]
    classes = [r["slice"] for r in next(iter(slices.values()))]
    classes = sorted(classes, key=lambda c: (len(c), c))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) + 2), 4))
    _grouped_bars(ax, classes, [(stage, {r["slice"]: r["accuracy"] for r in rows}, stage, 1.0)
                                for stage, rows in slices.items()])
    low = min(r["accuracy"] for rows in slices.values() for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def reliability_plot(report: dict, path: Path) -> Path:
    """Accuracy against mean confidence per bin (marker area ~ examples in the bin), with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect")
    for stage, bins in report["calibration"].items():
        ece, total = report["stages"][stage]["ece"], sum(b["count"] for b in bins)
        xs, ys = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        color = STAGE_COLORS.get(stage)
        ax.plot(xs, ys, "-", color=color, alpha=0.3, linewidth=1)
        ax.scatter(xs, ys, s=[8 + 200 * b["count"] / total for b in bins], color=color, alpha=0.8,
                   label=f"{stage} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(fontsize=7)
    return _save(fig, path)


def robustness_plot(report: dict, path: Path) -> Path:
    """Task metric against noise level for each stage (token dropout, when measured, dashed)."""
    plt = _pyplot()
    robust = report["robustness"]
    fig, ax = plt.subplots(figsize=(5, 4))
    series = [(robust, "o-", "")]
    if report.get("robustness_dropout"):
        series = [(robust, "o-", " (substitution)"), (report["robustness_dropout"], "s--", " (dropout)")]
    for section, style, suffix in series:
        for stage, values in section["stages"].items():
            ax.plot(section["levels"], values, style, label=stage + suffix, color=STAGE_COLORS.get(stage))
    ax.set_xlabel("noise level (Gaussian sigma / share of tokens replaced)")
    ax.set_ylabel(ROBUSTNESS_LABELS.get(robust["metric"], robust["metric"]))
    ax.legend(fontsize=7)
    return _save(fig, path)


def size_plot(points: list[dict[str, Any]], metric: str, path: Path, title: str = "size vs metric",
              pareto: Optional[list[int]] = None, xlabel: str = "bytes on disk (log)") -> Path:
    """Scatter of bytes against `metric`, labelled; indices in `pareto` joined as the front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    seen: dict[tuple, int] = {}
    for i, p in enumerate(points):
        on_front = pareto is not None and i in pareto
        ax.scatter(p["bytes"], p[metric], color="#d62728" if on_front else "#1f77b4", zorder=4 if on_front else 3)
        stacked = seen.get((p["bytes"], p[metric]), 0)  # equal points: labels one above the other
        seen[(p["bytes"], p[metric])] = stacked + 1
        ax.annotate(p["label"], (p["bytes"], p[metric]), fontsize=7, xytext=(3, 3 + 9 * stacked),
                    textcoords="offset points")
    if pareto:
        front = sorted((points[i] for i in pareto), key=lambda p: p["bytes"])
        ax.plot([p["bytes"] for p in front], [p[metric] for p in front], "--", color="#d62728",
                label="Pareto front", zorder=2)
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    return _save(fig, path)


def _metric(report: dict) -> str:
    return report.get("metric") or main_metric(report["task"])


def _size_points(report: dict) -> list[dict[str, Any]]:
    size, stages = report["size"], report["stages"]
    key = _metric(report)
    nbytes = {"float": size["float_bytes"], "ptq": size["int4_bytes"], "qat": size["int4_bytes"],
              "int4": size["int4_bytes"]}
    return [{"label": s, "bytes": nbytes[s], key: stages[s][key]} for s in stages if s in nbytes]


def write_all(report: dict, directory: Path) -> dict[str, Path]:
    """Every plot the report has data for, as PNG files in `directory`."""
    written = {"layers": layers_plot(report, directory / "layers.png")}
    if report.get("calibration"):
        written["reliability"] = reliability_plot(report, directory / "reliability.png")
    if report.get("slices"):
        written["slices"] = slices_plot(report, directory / "slices.png")
    if report.get("robustness"):
        written["robustness"] = robustness_plot(report, directory / "robustness.png")
    if report.get("size"):
        written["size"] = size_plot(_size_points(report), _metric(report), directory / "size.png")
    return written
