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


def _worst_first(rows_by_stage: dict[str, list[dict]], key: str) -> tuple[list[str], str]:
    """Category names in the order of the report's tables (worst first) for the int4 stage, else the last
    stage listed; then every name only another stage has. Returns the names and the stage they follow."""
    focus = "int4" if "int4" in rows_by_stage else next(reversed(rows_by_stage))
    names = [r[key] for r in rows_by_stage[focus]] + [r[key] for rows in rows_by_stage.values() for r in rows]
    return list(dict.fromkeys(names)), focus


def layers_plot(report: dict, path: Path) -> Path:
    """Bars: weight SQNR and per-layer output SQNR of each quantized stage (dB), layers in the order of the
    report's output-error table (worst int4 output first)."""
    plt = _pyplot()
    layers = report["layers"]
    names, focus = _worst_first(layers["output_error"], "layer")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 3), 4))
    series = [(f"{s} weight", {r["layer"]: r["weight_sqnr_db"] for r in rows}, s)
              for s, rows in layers["weight_sqnr"].items()]
    series += [(f"{s} output", {r["layer"]: r["output_sqnr_db"] for r in rows}, s)
               for s, rows in layers["output_error"].items()]
    bars = [(label, {n: _finite(v) for n, v in values.items()}, stage, 0.5 if "weight" in label else 1.0)
            for label, values, stage in series]
    _grouped_bars(ax, names, bars, rotation=30, ha="right")
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.set_title(f"per-layer SQNR vs float (worst {focus} output first)")
    _legend_outside(ax, len(bars))
    return _save(fig, path)


def _legend_outside(ax: Any, entries: int) -> None:
    """The legend in a row under the axes, where it hides no data."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(entries, 5), frameon=False)


def slices_plot(report: dict, path: Path) -> Path:
    """Grouped bars from 0: per-class error rate (1 - accuracy) of each stage, classes in the order of the
    report's per-class table (worst int4 class first). Error rates from 0 show differences of a few
    points that accuracy bars from 0 would hide, without an axis cut off below."""
    plt = _pyplot()
    slices = report["slices"]
    classes, focus = _worst_first(slices, "slice")
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) + 2), 4.2))
    _grouped_bars(ax, classes, [(stage, {r["slice"]: 1.0 - r["accuracy"] for r in rows}, stage, 1.0)
                                for stage, rows in slices.items()])
    high = max(1.0 - r["accuracy"] for rows in slices.values() for r in rows)
    ax.set_ylim(0.0, max(0.05, high * 1.15))
    ax.set_xlabel(f"class (worst {focus} first)")
    ax.set_ylabel("error rate (1 - accuracy, lower is better)")
    ax.set_title("per-class error rate")
    _legend_outside(ax, len(slices))
    return _save(fig, path)


def merge_sparse_bins(bins: list[dict], min_count: int) -> list[dict]:
    """Adjacent confidence bins merged until each holds at least `min_count` examples (the last merged
    into its neighbour), with count-weighted confidence and accuracy: a bin of 1 or 2 examples has an
    accuracy of 0 or 1 by chance, which would draw a zig-zag that says nothing about calibration."""
    merged: list[dict] = []
    for b in (b for b in bins if b["count"]):
        last = merged[-1] if merged else None
        if last is not None and last["count"] < min_count:
            total = last["count"] + b["count"]
            merged[-1] = {"lo": last["lo"], "hi": b["hi"], "count": total,
                          "confidence": (last["confidence"] * last["count"] + b["confidence"] * b["count"]) / total,
                          "accuracy": (last["accuracy"] * last["count"] + b["accuracy"] * b["count"]) / total}
        else:
            merged.append(dict(b))
    if len(merged) > 1 and merged[-1]["count"] < min_count:
        tail = merged.pop()
        merged[-1] = merge_sparse_bins([merged[-1], tail], min_count=math.inf)[0]
    return merged


def reliability_plot(report: dict, path: Path) -> Path:
    """Accuracy against mean confidence per bin, sparse bins merged (`merge_sparse_bins`; marker area ~
    examples), with the diagonal; under it, how many examples fall in each confidence bin (log scale)."""
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    min_count = 0
    for stage, bins in report["calibration"].items():
        ece, total = report["stages"][stage]["ece"], sum(b["count"] for b in bins)
        min_count = max(10, total // 100)
        shown = merge_sparse_bins(bins, min_count)
        xs, ys = [b["confidence"] for b in shown], [b["accuracy"] for b in shown]
        color = STAGE_COLORS.get(stage)
        ax.plot(xs, ys, "-", color=color, alpha=0.4, linewidth=1)
        ax.scatter(xs, ys, s=[8 + 200 * b["count"] / total for b in shown], color=color, alpha=0.8,
                   label=f"{stage} (ECE {ece:.3f})")
        counts.bar([b["lo"] for b in bins], [b["count"] for b in bins], [b["hi"] - b["lo"] for b in bins],
                   align="edge", fill=False, edgecolor=color, linewidth=1)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (bins of under {min_count} examples merged)", fontsize=10)
    legend = ax.legend(fontsize=7, loc="upper left")
    for handle in legend.legend_handles[1:]:  # one marker size in the legend, whatever the first bin's count
        handle.set_sizes([30])
    counts.set_yscale("log")
    counts.set_xlabel("confidence")
    counts.set_ylabel("examples")
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
    # The report's "Gaussian input noise (level: sigma)": what goes in the title, the level on the x axis.
    what, _, level = robust.get("perturbation", "input noise").partition(" (level: ")
    if len(series) > 1:
        what = "token substitution (solid) and dropout (dashed)"
    ax.set_xlabel(f"noise level: {level.removesuffix(')')}" if level else "noise level")
    ax.set_ylabel(ROBUSTNESS_LABELS.get(robust["metric"], robust["metric"]))
    ax.set_title(f"robustness: {robust['metric']} under {what}", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def adversarial_plot(report: dict, path: Path) -> Path:
    """Accuracy against attack size, FGSM left and PGD right: each stage attacked white-box (solid) and,
    dashed, the examples crafted on the float model measured on the other stages (transfer); eps 0: clean."""
    plt = _pyplot()
    adv = report["adversarial"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    eps = [0.0, *adv["eps"]]
    for ax, attack in zip(axes, ("fgsm", "pgd"), strict=True):
        for kind, style, suffix in (("white_box", "o-", ""), ("transfer", "s--", f" (from {adv['source']})")):
            for stage, values in adv[kind][attack].items():
                ax.plot(eps, [adv["clean"][stage], *values], style, label=stage + suffix,
                        color=STAGE_COLORS.get(stage), alpha=1.0 if kind == "white_box" else 0.6)
        title = "FGSM" if attack == "fgsm" else f"PGD, {adv['steps']} steps"
        ax.set_title(f"{title} (L-inf, {adv['examples']} examples)", fontsize=10)
        ax.set_xlabel("eps (model input units)")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("accuracy under attack")
    _legend_outside(axes[0], 4)
    return _save(fig, path)


def size_plot(points: list[dict[str, Any]], metric: str, path: Path, title: Optional[str] = None,
              pareto: Optional[list[int]] = None, xlabel: str = "bytes on disk (log)") -> Path:
    """Scatter of bytes against `metric`, each point labelled (stage names in their stage colours); labels
    that would overlap are moved apart with a line to their point; indices in `pareto` joined as the front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, p in enumerate(points):
        on_front = pareto is not None and i in pareto
        color = STAGE_COLORS.get(p["label"], "#d62728" if on_front else "#1f77b4")
        ax.scatter(p["bytes"], p[metric], color=color, zorder=4 if on_front else 3)
    if pareto:
        front = sorted((points[i] for i in pareto), key=lambda p: p["bytes"])
        ax.plot([p["bytes"] for p in front], [p[metric] for p in front], "--", color="#d62728",
                label="Pareto front", zorder=2)
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_bytes_formatter(ax))
    ax.xaxis.set_minor_formatter(_bytes_formatter(ax, minor=True))
    ax.tick_params(axis="x", which="both", labelsize=8)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or f"size vs {metric}")
    _label_points(ax, points, metric)
    return _save(fig, path)


def _bytes_formatter(ax: Any, minor: bool = False) -> Any:
    """Tick labels in B / kB / MB / GB on a log axis; minor ticks labelled all where the axis spans under a
    decade, at 2x and 5x a power of ten under two decades, else not at all."""
    from matplotlib.ticker import FuncFormatter

    def text(value: float, _position: Any) -> str:
        if value <= 0:
            return ""
        lead = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        low, high = ax.get_xlim()
        decades = math.log10(high / low) if low > 0 else math.inf
        if minor and (decades >= 2 or (decades >= 1 and lead not in (2, 5))):
            return ""
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= scale:
                return f"{value / scale:g} {unit}"
        return f"{value:g} B"

    return FuncFormatter(text)


def _label_points(ax: Any, points: list[dict[str, Any]], metric: str, fontsize: float = 7) -> None:
    """Annotate each point with its label (points at the same place share one, "qat, int4"), lowest point
    first: a label that would overlap one already placed (in display space) moves up until it does not,
    joined to its point by a thin line."""
    fig = ax.figure
    fig.canvas.draw()  # final limits and scales, so data -> pixel is what gets saved
    to_pixels, points_per_pixel = ax.transData.transform, 72 / fig.dpi
    height = 1.3 * fontsize / points_per_pixel
    shared: dict[tuple, list[str]] = {}
    for p in points:
        shared.setdefault((p["bytes"], p[metric]), []).append(p["label"])
    labelled = [{"bytes": at[0], metric: at[1], "label": ", ".join(labels)} for at, labels in shared.items()]
    placed: list[tuple[float, float, float]] = []  # x, y (pixels) and width of each placed label
    for p in sorted(labelled, key=lambda p: (p[metric], p["bytes"])):
        x, y = to_pixels((p["bytes"], p[metric]))
        width = 0.62 * fontsize * len(p["label"]) / points_per_pixel
        left, bottom = x + 4 / points_per_pixel, y + 3 / points_per_pixel
        if left + width > ax.bbox.x1:  # past the right edge: the label goes to the left of its point
            left = x - 4 / points_per_pixel - width
        while any(left < px + pw and px < left + width and abs(bottom - py) < height for px, py, pw in placed):
            bottom += height / 2
        placed.append((left, bottom, width))
        moved = bottom - y > 4 / points_per_pixel
        ax.annotate(p["label"], (p["bytes"], p[metric]), fontsize=fontsize, textcoords="offset points",
                    xytext=((left - x) * points_per_pixel, (bottom - y) * points_per_pixel),
                    color=STAGE_COLORS.get(p["label"], "black"), va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.6} if moved else None)


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
    if report.get("adversarial"):
        written["adversarial"] = adversarial_plot(report, directory / "adversarial.png")
    if report.get("size"):
        written["size"] = size_plot(_size_points(report), _metric(report), directory / "size.png")
    return written
