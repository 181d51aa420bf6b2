"""Write an evaluation report dict as `report.json`, `report.md` and PNG plots.

The Markdown shows the numbers of the JSON (same values, rounded for reading); the
plots (matplotlib, Agg backend, no display needed) are written next to them:

    layers.png        per-layer weight SQNR and output SQNR, worst first
    slices.png        per-class error rate (1 - accuracy) of each stage, worst class first
    reliability.png   reliability diagram (accuracy against confidence per bin, sparse bins merged),
                      the examples per bin under it
    robustness.png    task metric against input-noise level
    adversarial.png   accuracy against attack size: white-box FGSM / PGD per stage, transfer from float
    size.png          file size against the task metric

Example:
    >>> paths = write_report(report, "runs/digits_w2a4/version_0")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qat.eval import plots

# noise / token substitution; token dropout; image brightness and contrast
ROBUSTNESS_KEYS = ("robustness", "robustness_dropout", "robustness_photometric")
STAGE_LABELS = {"float": "float", "ptq": "PTQ", "qat": "QAT", "int4": "int4 file"}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


STAGE_COLUMNS = ("accuracy", "perplexity", "perplexity_ratio", "cosine", "nn_agreement", "nll", "ece", "agreement",
                 "kl", "correct_to_wrong", "wrong_to_correct")
COUNTED = {"classification": "examples", "language_model": "next tokens scored", "causal_lm": "next tokens scored",
           "embedding": "sentences"}
AGAINST_FLOAT = {"embedding": "cosine and nearest-neighbour agreement against the float embeddings",
                 "language_model": "same-top-token rate (agreement), KL of the next-token distributions, perplexity "
                                   "ratio and flips against float",
                 "causal_lm": "same-top-token rate (agreement), KL of the next-token distributions, perplexity "
                              "ratio and flips against float"}


def stage_columns(report: dict) -> list[str]:
    """The metrics of the stages table (those the float row has), in reading order."""
    return [k for k in STAGE_COLUMNS if k in report["stages"]["float"]]


def _stages_section(report: dict) -> list[str]:
    stages = report["stages"]
    keys = stage_columns(report)
    against = AGAINST_FLOAT.get(report["task"], "agreement, KL and flips against float")
    split = f" of the {report['split']} split" if report.get("split") else ""
    lines = [f"## Stages ({report['examples']} {COUNTED.get(report['task'], 'examples')}{split}; {against})", "",
             f"Float is {report.get('float_is', 'the model at the end of FP warm-up')}; QAT also trains the "
             "weights further, so its distance to float is quantization error plus that training.", ""]
    lines += _table(["stage", *keys], [[STAGE_LABELS.get(s, s), *(row[k] for k in keys)] for s, row in stages.items()])
    for name, gap in report.get("gap_recovered", {}).items():
        if gap:
            cells = ", ".join(f"{k} {_fmt(v, 1)}%" for k, v in gap.items() if v is not None)
            lines += [f"% of the PTQ gap recovered by {STAGE_LABELS.get(name, name)}: {cells or 'no gap'}", ""]
    return lines


def _domains_section(report: dict) -> list[str]:
    domains = report.get("domains")
    if not domains:
        return []
    if "cosine" in next(iter(domains.values())):
        return _embedding_domains_section(domains)
    stages = list(next(iter(domains.values()))["perplexity"])
    gaps = [s for s in ("qat", "int4") if s in stages]
    lines = ["## Perplexity by domain (% of the PTQ gap recovered: (PTQ - stage) / (PTQ - float) in perplexity)", "",
             "The first row is the held-out end of the training text; the others are evaluation domains "
             "(`data.args.eval_corpora`), text the run never trained or calibrated on.", ""]
    head = ["domain", "next tokens", *(STAGE_LABELS.get(s, s) for s in stages),
            *(f"{STAGE_LABELS.get(s, s)} % gap recovered" for s in gaps)]
    body = [[name or "training text (held-out end)", row["tokens"], *(row["perplexity"][s] for s in stages),
             *(_fmt(row["gap_recovered"].get(s), 1) for s in gaps)] for name, row in domains.items()]
    return lines + _table(head, body)


def _embedding_domains_section(domains: dict) -> list[str]:
    stages = list(next(iter(domains.values()))["cosine"])
    gaps = [s for s in ("qat", "int4") if s in stages]
    lines = ["## Embeddings by domain (cosine to the float embeddings; nearest-neighbour agreement; % of the PTQ "
             "cosine gap recovered: (stage - PTQ) / (float - PTQ))", "",
             "The first row is the held-out end of the training text; the others are evaluation domains "
             "(`data.args.eval_corpora`), text the run never trained or calibrated on.", ""]
    head = ["domain", "sentences", *(f"{STAGE_LABELS.get(s, s)} cosine" for s in stages),
            *(f"{STAGE_LABELS.get(s, s)} NN agreement" for s in stages),
            *(f"{STAGE_LABELS.get(s, s)} % gap recovered" for s in gaps)]
    body = [[name or "training text (held-out end)", row["sentences"], *(row["cosine"][s] for s in stages),
             *(row["nn_agreement"][s] for s in stages), *(_fmt(row["gap_recovered"].get(s), 1) for s in gaps)]
            for name, row in domains.items()]
    return lines + _table(head, body)


def _size_section(report: dict) -> list[str]:
    size, lines = report.get("size"), []
    if size:
        lines += ["## Size", ""]
        lines += _table(["model", "bytes on disk", "bits/weight (quantized layers, scales included)",
                         "vs float file", "bytes with codes at nominal width"],
                        [["float (fp32 safetensors)", size["float_bytes"], 32.0, 1.0, size["float_bytes"]],
                         ["int4 file", size["int4_bytes"], size["bits_per_weight"], size["ratio_vs_float"],
                          size["nominal_bytes"]]])
    latency = report.get("latency")
    if latency:
        lines += [f"## CPU latency ({latency['threads']} threads; median of 7, a shared machine: ratios only)", ""]
        lines += _table(["batch", "float ms", "int4 ms", "float / int4"],
                        [[r["batch"], r["float_ms"], r["int4_ms"], r["speedup"]] for r in latency["rows"]])
    return lines


def _layers_section(report: dict) -> list[str]:
    layers, lines = report["layers"], []
    for stage, rows in layers["weight_sqnr"].items():
        lines += [f"## Per-layer weight SQNR, {STAGE_LABELS.get(stage, stage)} (worst first)", ""]
        lines += _table(["layer", "bits", "weights", "SQNR dB", "clipped"],
                        [[r["layer"], r["bits"], r["weights"], r["weight_sqnr_db"], r["clipped"]] for r in rows])
    for stage, rows in layers["output_error"].items():
        lines += [f"## Per-layer output error, {STAGE_LABELS.get(stage, stage)} (same input as float; worst first)",
                  ""]
        lines += _table(["layer", "type", "output SQNR dB", "relative MSE"],
                        [[r["layer"], r["type"], r["output_sqnr_db"], r["relative_mse"]] for r in rows])
    return lines


def _slices_section(report: dict) -> list[str]:
    slices = report.get("slices")
    if not slices:
        return []
    focus = "int4" if "int4" in slices else next(reversed(slices))
    order = [r["slice"] for r in slices[focus]]
    by_stage = {s: {r["slice"]: r for r in rows} for s, rows in slices.items()}
    lines = [f"## Per-class accuracy (worst first by {STAGE_LABELS.get(focus, focus)})", ""]
    head = ["class", "size", *(STAGE_LABELS.get(s, s) for s in slices)]
    rows = [[c, by_stage[focus][c]["size"], *(by_stage[s][c]["accuracy"] for s in slices)] for c in order]
    return lines + _table(head, rows)


def _robustness_section(report: dict) -> list[str]:
    lines: list[str] = []
    for key in ROBUSTNESS_KEYS:
        robust = report.get(key)
        if not robust:
            continue
        what = "cosine to the float embeddings of the clean input" if robust["metric"] == "cosine" \
            else robust["metric"]
        subset = f" ({report['robustness_examples']} examples)" if report.get("robustness_examples") else ""
        lines += [f"## Robustness: {what} under {robust.get('perturbation', 'input noise')}{subset}", ""]
        head = ["level", *(STAGE_LABELS.get(s, s) for s in robust["stages"])]
        rows = [[lvl, *(vals[i] for vals in robust["stages"].values())] for i, lvl in enumerate(robust["levels"])]
        lines += _table(head, rows)
    return lines


def _adversarial_section(report: dict) -> list[str]:
    adv = report.get("adversarial")
    if not adv:
        return []
    low, high = adv["input_range"]
    source = STAGE_LABELS.get(adv["source"], adv["source"])
    lines = [f"## Adversarial robustness: accuracy under L-inf attacks ({adv['examples']} examples)", "",
             f"eps in the model's input units (the clean inputs span [{low:.4g}, {high:.4g}]; attacked inputs are "
             f"clipped to it). FGSM: one signed-gradient step of eps; PGD: {adv['steps']} steps of {adv['alpha']} "
             "from a random start in the eps-ball. White-box: crafted on each stage itself (the int4 file through "
             f"its straight-through gradients); transfer: crafted on {source}, measured on the others. eps 0: clean.",
             ""]
    stages = list(adv["white_box"]["fgsm"])
    for kind, title in (("white_box", "White-box"), ("transfer", f"Transfer from {source}")):
        targets = list(adv[kind]["fgsm"])
        if not targets:
            continue
        head = ["eps", *(f"{STAGE_LABELS.get(s, s)} {attack.upper()}" for attack in ("fgsm", "pgd") for s in targets)]
        rows = [[0.0, *(adv["clean"][s] for _ in ("fgsm", "pgd") for s in targets)]]
        rows += [[eps, *(adv[kind][attack][s][i] for attack in ("fgsm", "pgd") for s in targets)]
                 for i, eps in enumerate(adv["eps"])]
        lines += [f"{title} (stages: {', '.join(STAGE_LABELS.get(s, s) for s in stages if s in targets)})", ""]
        lines += _table(head, rows)
    return lines


def _sensitivity_section(report: dict) -> list[str]:
    sens = report.get("sensitivity")
    if not sens:
        return []
    lines = ["## Per-layer sensitivity (KL to float with only that layer's weights quantized; most sensitive first)",
             ""]
    bits = sens["bits_choices"]
    lines += _table(["layer", "weights", *(f"{b}-bit KL" for b in bits)],
                    [[r["layer"], r["weights"], *(r["kl"][str(b)] for b in bits)] for r in sens["layers"]])
    suggestion = sens.get("suggestion")
    if suggestion:
        lines += [f"Suggested bits under an average of {suggestion['budget_bits']} bits/weight "
                  f"(achieved {suggestion['average_bits']:.4f}): paste into the recipe or pass on the command line:",
                  "", "```", suggestion["override"], "```", ""]
    return lines


def _not_applicable_section(report: dict) -> list[str]:
    skipped = report.get("not_applicable")
    if not skipped:
        return []
    return ["## Not measured for this model", "", *(f"- {name}: {reason}" for name, reason in skipped.items()), ""]


def markdown(report: dict) -> str:
    """The report as Markdown (the numbers of `report`, rounded to 4 decimals)."""
    title = f"# Evaluation report: {report.get('name', 'model')}"
    lines = [title, "", f"Source: `{report.get('source', '?')}`; task: {report['task']}.", ""]
    if report.get("plots"):
        lines += [" ".join(f"![{p}]({p})" for p in report["plots"]), ""]
    for section in (_stages_section, _domains_section, _size_section, _slices_section, _robustness_section,
                    _adversarial_section, _layers_section, _sensitivity_section, _not_applicable_section):
        lines += section(report)
    return "\n".join(lines)


def write_report(report: dict, directory: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `directory`; their paths by name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = plots.write_all(report, directory)
    report["plots"] = [p.name for p in written.values()]
    paths = {"json": directory / "report.json", "md": directory / "report.md", **written}
    paths["json"].write_text(json.dumps(report, indent=1, default=_json_default))
    paths["md"].write_text(markdown(report))
    return paths


def _json_default(value: Any) -> Any:
    return str(value)
