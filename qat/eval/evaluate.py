"""Compute the evaluation report: float, PTQ, QAT and int4 side by side, as one dict.

`compare` takes the models and the data, runs each model once over the validation set
(`qat.eval.outputs.collect`), and derives every figure from those outputs with the
plain functions of `qat.eval.metrics`; robustness, per-layer errors, size and latency
are added by their own functions. `report.py` writes the dict as JSON, Markdown and plots.

By task (`qat.tasks`, which also splits, feeds and scores the batches):

    classification            accuracy; agreement, flips, KL, ECE; per-class slices
    language_model, causal_lm perplexity per next token; same-top-token rate, KL of the
                              next-token distributions, perplexity ratio (as llama.cpp's
                              KL-divergence tool reports); flips and ECE per token
    embedding                 mean cosine to the float embeddings and top-1 nearest-neighbour
                              agreement (`compare_embeddings`)

Sections that do not apply to a task are listed in `report["not_applicable"]` with the reason.
Language models with evaluation domains (`TextDataModule(eval_corpora=...)`) get `report["domains"]`
(`domain_perplexity`): each stage's perplexity on each domain and the % of the PTQ gap recovered there;
sentence encoders (`SentenceDataModule(eval_corpora=...)`) each stage's cosine to the float embeddings and
nearest-neighbour agreement on each domain (`domain_embeddings`).

Example:
    >>> report = compare({"float": fp, "ptq": ptq, "qat": qat, "int4": int4}, val_batches, "classification")
    >>> report["stages"]["qat"]["agreement"]
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qat.eval import adversarial, metrics
from qat.eval.layers import output_errors, weight_sqnr
from qat.eval.outputs import Outputs, collect, collect_embeddings
from qat.eval.robustness import PHOTOMETRIC_SHIFTS, default_levels, describe, is_image_batch, perturbation, photometric
from qat.tasks import IGNORE, Task, make_task, model_output

REFERENCE = "float"
LM_TASKS = ("language_model", "causal_lm")
# metric -> True when higher is better; the gap-recovered figure is computed for these
GAP_METRICS = {"accuracy": True, "perplexity": False, "nll": False, "ece": False, "agreement": True, "kl": False,
               "cosine": True, "nn_agreement": True}
SLICES_NOT_FOR_LMS = ("per-class slices do not apply to next-token prediction: every vocabulary entry is a class, "
                      "most seen a few times; see agreement, KL and the perplexity ratio instead")
NOT_FOR_EMBEDDINGS = {
    "calibration": "an embedding model has no class probabilities: no ECE or reliability diagram",
    "slices": "an embedding model has no labels: no per-class slices",
    "flips": "an embedding model makes no predictions to flip; nearest-neighbour agreement takes their place",
}


def main_metric(task: str) -> str:
    """The report's task metric: perplexity for language models, cosine for embeddings, else accuracy."""
    return "perplexity" if task in LM_TASKS else "cosine" if task == "embedding" else "accuracy"


def _task(task: str | Task) -> Task:
    return make_task(task) if isinstance(task, str) else task


def stage_metrics(out: Outputs, reference: Outputs, task: str) -> dict[str, Any]:
    """Every scalar metric of one stage against the float reference's outputs."""
    flip = metrics.flips(out.predictions, reference.predictions, out.labels)
    row = {
        "accuracy": metrics.accuracy(out.logits, out.labels),
        "nll": metrics.nll(out.logits, out.labels),
        "ece": metrics.ece(out.probabilities, out.labels),
        "agreement": metrics.agreement(out.logits, reference.logits),
        "kl": metrics.mean_kl(out.logits, reference.logits),
        "correct_to_wrong": flip["correct_to_wrong"], "wrong_to_correct": flip["wrong_to_correct"],
        "correct_to_wrong_rate": flip["correct_to_wrong_rate"], "wrong_to_correct_rate": flip["wrong_to_correct_rate"],
        "count": flip["count"],
    }
    if task in LM_TASKS:
        row["perplexity"] = metrics.perplexity(out.logits, out.labels)
        row["perplexity_ratio"] = metrics.perplexity_ratio(out.logits, reference.logits, out.labels)
    return row


def gap_recovered(stages: dict[str, dict[str, Any]], quantized: str = "qat") -> dict[str, Optional[float]]:
    """% of the float-to-PTQ gap that `quantized` recovers, per metric (None: PTQ is not worse than
    float there, so there is no gap). Over 100%: better than float."""
    if "ptq" not in stages or quantized not in stages:
        return {}
    fp, ptq, q = stages[REFERENCE], stages["ptq"], stages[quantized]
    result: dict[str, Optional[float]] = {}
    for key, higher_is_better in GAP_METRICS.items():
        if key in fp:
            ptq_worse = ptq[key] < fp[key] if higher_is_better else ptq[key] > fp[key]
            result[key] = metrics.gap_recovered(fp[key], ptq[key], q[key]) if ptq_worse else None
    return result


@torch.no_grad()
def streamed_perplexity(model: nn.Module, batches: Sequence, task: Task) -> tuple[float, int]:
    """(perplexity, next tokens scored) of `model` over `batches`, one batch at a time: no logits are kept."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            inputs, targets = task.split(batch)
            logits = task.scored(task.forward(model, inputs)).float()
            targets = targets.to(logits.device)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    return (math.exp(total / count) if count else float("nan")), count


def domain_perplexity(models: dict[str, nn.Module], domains: dict[str, Sequence], task: str | Task,
                      stages: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """Each model's perplexity on each evaluation domain ({name: batches}) and the % of the float-to-PTQ gap
    that QAT and the int4 file recover there: 100 * (ptq - stage) / (ptq - float), None where PTQ is not
    worse. With `stages` (the report's rows, measured on the training text's held-out end) that text is the
    first row, named ''."""
    task = _task(task)
    rows: dict[str, Any] = {}
    if stages is not None and all("perplexity" in row for row in stages.values()):
        rows[""] = {"tokens": int(stages[REFERENCE].get("count", 0)),
                    "perplexity": {name: row["perplexity"] for name, row in stages.items()}}
    for domain, batches in domains.items():
        figures = {name: streamed_perplexity(model, batches, task) for name, model in models.items()}
        rows[domain] = {"tokens": figures[REFERENCE][1], "perplexity": {name: f[0] for name, f in figures.items()}}
    for row in rows.values():
        ppl = row["perplexity"]
        row["gap_recovered"] = {stage: metrics.gap_recovered(ppl[REFERENCE], ppl["ptq"], ppl[stage])
                                if "ptq" in ppl and ppl["ptq"] > ppl[REFERENCE] else None
                                for stage in ("qat", "int4") if stage in ppl}
    return rows


def domain_embeddings(models: dict[str, nn.Module], domains: dict[str, Sequence], task: str | Task,
                      stages: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """Each model's cosine to the float embeddings and nearest-neighbour agreement on each evaluation domain
    ({name: batches}), and the % of the float-to-PTQ cosine gap that QAT and the int4 file recover there (None
    where PTQ is not worse). With `stages` (the report's rows, on the held-out sentences of the training text)
    that text is the first row, named ''."""
    task = _task(task)
    rows: dict[str, Any] = {}
    if stages is not None and all("cosine" in row for row in stages.values()):
        rows[""] = {"sentences": int(stages[REFERENCE].get("count", 0)),
                    **{key: {name: row[key] for name, row in stages.items()} for key in ("cosine", "nn_agreement")}}
    for domain, batches in domains.items():
        embeddings = {name: collect_embeddings(model, batches, task, describe=f" ({name}, {domain})")
                      for name, model in models.items()}
        reference = embeddings[REFERENCE]
        rows[domain] = {"sentences": int(reference.shape[0]),
                        "cosine": {name: metrics.mean_cosine(e, reference) for name, e in embeddings.items()},
                        "nn_agreement": {name: metrics.neighbour_agreement(e, reference)
                                         for name, e in embeddings.items()}}
    for row in rows.values():
        cosine = row["cosine"]
        row["gap_recovered"] = {stage: metrics.gap_recovered(cosine[REFERENCE], cosine["ptq"], cosine[stage])
                                if "ptq" in cosine and cosine["ptq"] < cosine[REFERENCE] else None
                                for stage in ("qat", "int4") if stage in cosine}
    return rows


def robustness(models: dict[str, nn.Module], batches: list, task: str | Task, levels: Sequence[float],
               vocab_size: Optional[int] = None, seed: int = 0, drop_token: Optional[int] = None) -> dict[str, Any]:
    """The task metric of each model under input perturbation at each level (same noise for all;
    token inputs: random substitution, or dropout to `drop_token` when given). Embeddings: the
    mean cosine of each model's embeddings of the perturbed input to the float model's
    embeddings of the clean input."""
    task = _task(task)
    key = main_metric(task.name)
    result: dict[str, Any] = {"metric": key, "levels": list(levels), "stages": {},
                              "perturbation": describe(task.split(batches[0])[0], drop_token)}
    clean = collect_embeddings(models[REFERENCE], batches, task) if key == "cosine" else None
    for name, model in models.items():
        values = []
        for level in levels:
            noisy = perturbation(level, seed, vocab_size, drop_token)
            if clean is not None:
                values.append(metrics.mean_cosine(collect_embeddings(model, batches, task, transform=noisy), clean))
                continue
            out = collect(model, batches, transform=noisy, task=task)
            values.append(metrics.perplexity(out.logits, out.labels) if key == "perplexity"
                          else metrics.accuracy(out.logits, out.labels))
        result["stages"][name] = values
    return result


def photometric_robustness(models: dict[str, nn.Module], batches: list, task: str | Task,
                           shifts: Sequence[tuple[str, float]] = PHOTOMETRIC_SHIFTS) -> dict[str, Any]:
    """Accuracy of each model under brightness and contrast shifts of the input images (same layout as
    `robustness`; levels are the shifts' names)."""
    task = _task(task)
    result: dict[str, Any] = {"metric": "accuracy", "levels": [f"{kind} {amount:+g}" if kind == "brightness"
                                                                else f"{kind} x{amount:g}" for kind, amount in shifts],
                              "stages": {}, "perturbation": "brightness / contrast shifts (inputs clamped to the "
                                                             "clean range)"}
    for name, model in models.items():
        values = []
        for kind, amount in shifts:
            out = collect(model, batches, transform=photometric(kind, amount), task=task)
            values.append(metrics.accuracy(out.logits, out.labels))
        result["stages"][name] = values
    return result


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: Any, repeats: int = 7) -> float:
    """Median wall time of one forward of `inputs`, in ms (after one warm-up call)."""
    model.eval()
    model_output(model, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model_output(model, inputs)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _slice_input(inputs: Any, rows: int) -> Any:
    return {k: v[:rows] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:rows]


def latency(float_model: nn.Module, int4_model: nn.Module, batch: Any, task: str | Task = "classification",
            ) -> dict[str, Any]:
    """CPU latency of the int4 model against float, on one input row and on a whole batch."""
    inputs, _ = _task(task).split(batch)
    rows = []
    for size in (1, len(inputs["input_ids"] if isinstance(inputs, dict) else inputs)):
        x = _slice_input(inputs, size)
        fp, q = latency_ms(float_model, x), latency_ms(int4_model, x)
        rows.append({"batch": size, "float_ms": fp, "int4_ms": q, "speedup": fp / q if q else None})
    return {"device": "cpu", "threads": torch.get_num_threads(), "rows": rows}


def per_layer(models: dict[str, nn.Module], batch: Any, task: str | Task = "classification") -> dict[str, Any]:
    """Weight SQNR of the fake-quant stages and each stage's per-layer output error, worst first."""
    inputs, _ = _task(task).split(batch)
    result: dict[str, Any] = {"weight_sqnr": {}, "output_error": {}}
    for name, model in models.items():
        if name == REFERENCE:
            continue
        sqnr = weight_sqnr(model)
        if sqnr:
            result["weight_sqnr"][name] = sqnr
        result["output_error"][name] = output_errors(models[REFERENCE], model, inputs)
    return result


def robustness_sections(models: dict[str, nn.Module], batches: list, task: Task,
                        noise_levels: Optional[Sequence[float]], vocab_size: Optional[int],
                        drop_token: Optional[int]) -> dict[str, Any]:
    """`robustness` (Gaussian noise, or typo-style token substitution) and, for token inputs with a
    `drop_token`, `robustness_dropout` (token dropout), for float, QAT and int4."""
    robust_models = {k: v for k, v in models.items() if k in (REFERENCE, "qat", "int4")}
    sample = task.split(batches[0])[0]
    levels = noise_levels if noise_levels is not None else default_levels(sample)
    sections = {"robustness": robustness(robust_models, batches, task, levels, vocab_size)}
    if is_image_batch(sample):
        sections["robustness_photometric"] = photometric_robustness(robust_models, batches, task)
    tokens = sample["input_ids"] if isinstance(sample, dict) else sample
    if drop_token is not None and not tokens.is_floating_point():
        sections["robustness_dropout"] = robustness(robust_models, batches, task, levels, vocab_size,
                                                    drop_token=drop_token)
    return sections


def compare(models: dict[str, nn.Module], batches: list, task: str, noise_levels: Optional[Sequence[float]] = None,
            vocab_size: Optional[int] = None, drop_token: Optional[int] = None,
            class_names: Optional[Sequence[str]] = None, robustness_examples: Optional[int] = None,
            adversarial_eps: Optional[Sequence[float]] = None, adversarial_examples: Optional[int] = 512,
            adversarial_steps: int = adversarial.DEFAULT_STEPS) -> dict[str, Any]:
    """The report dict of `models` (must include 'float') on `batches` (a list of batches) for `task`
    (a `qat.tasks` name); `drop_token` (e.g. the tokenizer's unknown token) adds token dropout
    to the robustness part; `class_names` (label id -> name) names the per-class rows;
    `robustness_examples` measures robustness on the leading batches holding that many examples (None: all).
    Image classifiers with `adversarial_eps` get `report["adversarial"]` (`qat.eval.adversarial.report_section`:
    FGSM / PGD with `adversarial_steps` steps, on the first `adversarial_examples` examples)."""
    if REFERENCE not in models:
        raise ValueError(f"compare needs a '{REFERENCE}' model as the reference; got {sorted(models)}")
    runner = make_task(task)
    if task == "embedding":
        return compare_embeddings(models, batches, runner, noise_levels, vocab_size, drop_token)
    outputs = {name: collect(model, batches, describe=f" ({name})", task=runner) for name, model in models.items()}
    reference = outputs[REFERENCE]
    stages = {name: stage_metrics(out, reference, task) for name, out in outputs.items()}
    report: dict[str, Any] = {
        "task": task, "metric": main_metric(task), "examples": int(reference.labels.numel()), "stages": stages,
        "gap_recovered": {"qat": gap_recovered(stages, "qat"), "int4": gap_recovered(stages, "int4")},
        "calibration": {name: metrics.reliability_bins(out.probabilities, out.labels) for name, out in outputs.items()},
        "layers": per_layer(models, batches[0], runner), "not_applicable": {},
    }
    if task == "classification":
        names = list(class_names) if class_names else None
        report["slices"] = {name: metrics.per_class(out.logits, out.labels, names) for name, out in outputs.items()}
    else:
        report["not_applicable"]["slices"] = SLICES_NOT_FOR_LMS
    robust_batches = leading_batches(batches, runner, robustness_examples)
    report.update(robustness_sections(models, robust_batches, runner, noise_levels, vocab_size, drop_token))
    report["robustness_examples"] = sum(runner.size(runner.split(batch)[0]) for batch in robust_batches)
    if adversarial_eps and task == "classification" and is_image_batch(runner.split(batches[0])[0]):
        report["adversarial"] = adversarial.report_section(models, [runner.split(b) for b in batches],
                                                           adversarial_eps, adversarial_examples, adversarial_steps)
    return report


def leading_batches(batches: list, task: Task, examples: Optional[int]) -> list:
    """The first batches of `batches` that hold at least `examples` examples (all of them for None)."""
    if examples is None:
        return batches
    taken, seen = [], 0
    for batch in batches:
        if seen >= examples:
            break
        taken.append(batch)
        seen += task.size(task.split(batch)[0])
    return taken


def compare_embeddings(models: dict[str, nn.Module], batches: list, task: Task,
                       noise_levels: Optional[Sequence[float]] = None, vocab_size: Optional[int] = None,
                       drop_token: Optional[int] = None) -> dict[str, Any]:
    """The report dict of sentence-embedding models: cosine to float and nearest-neighbour agreement."""
    embeddings = {name: collect_embeddings(model, batches, task, describe=f" ({name})")
                  for name, model in models.items()}
    reference = embeddings[REFERENCE]
    stages = {name: {"cosine": metrics.mean_cosine(e, reference),
                     "nn_agreement": metrics.neighbour_agreement(e, reference), "count": int(e.shape[0])}
              for name, e in embeddings.items()}
    report: dict[str, Any] = {
        "task": task.name, "metric": "cosine", "examples": int(reference.shape[0]), "stages": stages,
        "gap_recovered": {"qat": gap_recovered(stages, "qat"), "int4": gap_recovered(stages, "int4")},
        "layers": per_layer(models, batches[0], task), "not_applicable": dict(NOT_FOR_EMBEDDINGS),
    }
    report.update(robustness_sections(models, batches, task, noise_levels, vocab_size, drop_token))
    return report
