"""Validation of the reference-free drift monitor (qat.monitor.reference_free) on shifted data.

For a run directory (its model.safetensors, recipe.yaml), this
  - takes the clean evaluation images (the test split, else validation) and splits them: the first part
    profiles the loaded int4 model (as `qat train` does at export with validation data), the rest is the clean
    production stream;
  - records once, per image, the monitor's per-sample features (hooks on the loaded model) and the logits, for
    the clean stream and for each shift of it (Gaussian noise, brightness, contrast: qat.eval.robustness) and,
    with --other-data, another data set of the same shape (its labels mean something else: no accuracy);
  - fits the label-free accuracy estimate (ATC, qat.monitor.accuracy) on the profile images and their labels, as
    the export does with validation data;
  - replays, once per alert kind (the accuracy alert with each ATC score, negative entropy and confidence; the
    drift test): per shift, `--trials` fresh monitors fed random batches of the shifted images (with replacement)
    until an alert or 500 samples: detection rate within 500 and median samples to the alert; on clean data one
    long stream of `--clean-samples` samples: alert onsets per 10,000 samples;
  - prints a markdown table: the true accuracy drop of each shift, the ATC estimate of it on the whole shifted
    set, the accuracy alert's detection rate and median samples to it, the drift test's detection rate.

    .venv/bin/python -m benchmarks.monitor.validate RUN_DIR [--profile-samples 180] [--limit 600]
        [--other-data qat.data.Mnist5kDataModule] [--min-shift 0.02] [--false-alarm 1e-3] [--cache FILE.pt]
        [--output FILE.md]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import qat
from benchmarks import record as record_module
from qat.data.loading import report_loader
from qat.eval.robustness import photometric
from qat.monitor.accuracy import ESTIMATORS, AccuracyEstimate
from qat.monitor.profile import ActivationTaps, CalibrationProfile, output_rows, profile_from_rows
from qat.monitor.reference_free import ACCURACY_ROWS, ReferenceFreeMonitor, ReferenceFreeStatus
from qat.recipe import load_recipe
from qat.run.models import instantiate

Shift = Callable[[Tensor], Tensor]
SHIFTS: dict[str, Shift] = {}


def noise(level: float) -> Shift:
    def transform(x: Tensor) -> Tensor:
        return x + level * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)

    return transform


for _level in (0.05, 0.1, 0.2, 0.3, 0.5):
    SHIFTS[f"noise {_level}"] = noise(_level)
for _amount in (0.1, 0.25, 0.5):
    SHIFTS[f"brightness +{_amount}"] = photometric("brightness", _amount)
for _amount in (0.75, 0.5):
    SHIFTS[f"contrast x{_amount}"] = photometric("contrast", _amount)


def evaluation_images(recipe_path: Path, data_target: Optional[str] = None, limit: int = 10**9) -> tuple:
    """(images, labels) of the recipe's evaluation split (or of `data_target` with the recipe's image args)."""
    recipe = load_recipe(recipe_path)
    spec = recipe.data
    if data_target is not None:
        args = {k: v for k, v in dict(spec.args).items() if k in ("resolution", "channels", "mean", "std")}
        spec = type(spec)(_target_=data_target, args=args)
    datamodule = instantiate(spec, "data")
    datamodule.setup("validate")
    xs, ys = [], []
    for x, y in report_loader(datamodule)[1]:
        xs.append(x)
        ys.append(y)
        if sum(len(t) for t in xs) >= limit:
            break
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


@torch.no_grad()
def record_rows(model: torch.nn.Module, taps: ActivationTaps, images: Tensor, bins: int,
                batch_size: int = 64) -> tuple[dict[str, Tensor], Tensor]:
    """({channel: (N, features)}, logits (N, C)) of `images` through `model` (hooks in `taps`)."""
    rows: dict[str, list[Tensor]] = {}
    logits = []
    for x in images.split(batch_size):
        out = model(x)
        for name, block in {**taps.take(len(x)), **output_rows(out, bins)}.items():
            rows.setdefault(name, []).append(block)
        logits.append(out.float())
    return {name: torch.cat(parts) for name, parts in rows.items()}, torch.cat(logits)


def replay(monitor: ReferenceFreeMonitor, rows: dict[str, Tensor], samples: int, batch: int,
           generator: torch.Generator, stop_at_alert: bool, leaders: dict) -> list[int]:
    """Feed `samples` samples drawn with replacement from `rows`; the sample counts at alert onsets (`leaders`
    counts the channel named first at each)."""
    count = next(iter(rows.values())).shape[0]
    onsets, seen = [], 0
    monitor.reset()

    def on_alert(status: ReferenceFreeStatus) -> None:
        if status.alerting:
            onsets.append(seen)
            first = status.layers[0] if status.layers else "(accuracy only)"
            leaders[first] = leaders.get(first, 0) + 1

    monitor.on_alert = on_alert
    while seen < samples:
        idx = torch.randint(0, count, (batch,), generator=generator)
        seen += batch
        monitor.add_rows({name: block[idx] for name, block in rows.items()})
        if onsets and stop_at_alert:
            break
    return onsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--profile-samples", type=int, default=180)
    parser.add_argument("--limit", type=int, default=10**9, help="clean evaluation images used in all")
    parser.add_argument("--other-data", help="data module of another data set of the same shape")
    parser.add_argument("--other-limit", type=int, default=600)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20, help="samples per monitor update in the replays")
    parser.add_argument("--clean-samples", type=int, default=100_000)
    parser.add_argument("--min-shift", type=float, default=0.02, help="the monitor's min_shift")
    parser.add_argument("--min-accuracy-drop", type=float, default=0.02, help="the monitor's min_accuracy_drop")
    parser.add_argument("--false-alarm", type=float, default=1e-3, help="the monitor's false_alarm per check")
    parser.add_argument("--cache", type=Path, help="recorded features and logits: read when it exists, else written")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("qat.monitor").setLevel(logging.ERROR)  # the replays cross thousands of drift warnings
    start = time.time()
    model = qat.load(args.run_dir / "model.safetensors").eval()
    if args.cache is not None and args.cache.exists():
        recorded = torch.load(args.cache, weights_only=False)
        if "clean_logits" not in recorded:
            raise SystemExit(f"{args.cache}: recorded before the accuracy estimate (no logits); give a new --cache")
    else:
        recorded = record(model, args)
        if args.cache is not None:
            torch.save(recorded, args.cache)
    text = analyse(model, recorded, args, time.time() - start)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


def record(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """The profile (JSON), the clean stream's features and accuracy, each shifted set's features and accuracy."""
    images, labels = evaluation_images(args.run_dir / "recipe.yaml", limit=args.limit)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    profile_idx, stream_idx = order[: args.profile_samples], order[args.profile_samples:]
    bins = 16
    taps = ActivationTaps(model, bins)
    profile_rows, profile_logits = record_rows(model, taps, images[profile_idx], bins)
    bounds = {name: (*taps.bounds[name], taps.lengths[name], "input" if name in taps.inputs else "activation")
              for name in taps.bounds}
    bounds.update({name: (0.0, 1.0, 1, name.split(".")[-1]) for name in ("output.confidence", "output.entropy")})
    estimate = AccuracyEstimate.fit(profile_logits, labels[profile_idx])  # as the export does with validation labels
    profile = profile_from_rows(profile_rows, bounds, bins, accuracy=estimate)
    taps.close()
    taps = ActivationTaps(model, bins, names=profile.channels, moments=False)
    clean_x, clean_y = images[stream_idx], labels[stream_idx]
    clean_rows, clean_logits = record_rows(model, taps, clean_x, bins)
    clean_acc = float((clean_logits.argmax(-1) == clean_y).float().mean())
    sets = {name: (shift(clean_x.clone()), clean_y) for name, shift in SHIFTS.items()}
    if args.other_data:
        other_x, _ = evaluation_images(args.run_dir / "recipe.yaml", args.other_data, args.other_limit)
        sets[args.other_data.rsplit(".", 1)[-1]] = (other_x, None)
    shifted = {}
    for name, (x, y) in sets.items():
        rows, logits = record_rows(model, taps, x, bins)
        shifted[name] = (rows, None if y is None else float((logits.argmax(-1) == y).float().mean()), logits)
    taps.close()
    return {"profile": profile.to_json(), "profile_samples": len(profile_idx), "clean": clean_rows,
            "clean_logits": clean_logits, "clean_samples": len(stream_idx), "clean_accuracy": clean_acc,
            "shifted": shifted}


def analyse(model: torch.nn.Module, recorded: dict, args: argparse.Namespace, seconds: float) -> str:
    """Replays of the recorded features through monitors with the arguments' settings: the markdown table."""
    profile = CalibrationProfile.from_json(recorded["profile"])
    estimate = profile.accuracy
    modes = {f"accuracy ({name})": {"alert_on": "accuracy", "estimator": name} for name in ESTIMATORS}
    modes["drift"] = {"alert_on": "drift"}
    monitors = {mode: ReferenceFreeMonitor(model, profile, window=500, min_samples=100, min_shift=args.min_shift,
                                           false_alarm=args.false_alarm, min_accuracy_drop=args.min_accuracy_drop,
                                           **options) for mode, options in modes.items()}

    def with_hits(rows: dict, logits: Tensor, mode: str) -> dict:
        name = modes[mode].get("estimator")
        return {**rows, ACCURACY_ROWS: estimate.values(logits, name)[:, None]} if name else rows

    def estimated_drop(logits: Tensor, name: str) -> float:  # on the whole set: validation mean - mean
        return estimate.baseline(name) - float(estimate.values(logits, name).mean())

    generator = torch.Generator().manual_seed(1)
    clean_acc = recorded["clean_accuracy"]
    drift = monitors["drift"]
    lines = [f"profile: {recorded['profile_samples']} clean images (validation accuracy "
             f"{100 * estimate.validation_accuracy:.1f} %; ATC thresholds: negative entropy "
             f"{estimate.thresholds['negative_entropy'].threshold:.4f}, confidence "
             f"{estimate.thresholds['confidence'].threshold:.4f}; mean confidence {estimate.mean_confidence:.4f}, "
             f"sd {estimate.confidence_sd:.4f}); clean stream: {recorded['clean_samples']} images "
             f"(accuracy {100 * clean_acc:.1f} %), replayed with replacement, {args.batch} samples per check; drift: "
             f"z threshold {drift.threshold:.2f} (false_alarm {args.false_alarm:g} per check, {len(drift.names)} "
             f"channels), min_shift {args.min_shift}; accuracy alert: estimated drop >= {args.min_accuracy_drop} and "
             f"z > {drift.accuracy_threshold:.2f} (one-sided, false_alarm {args.false_alarm:g} per check)", ""]
    for mode, monitor in monitors.items():
        leaders: dict = {}
        onsets = replay(monitor, with_hits(recorded["clean"], recorded["clean_logits"], mode), args.clean_samples,
                        args.batch, generator, stop_at_alert=False, leaders=leaders)
        lines.append(f"clean, {mode} alert: {len(onsets)} alert onsets in {args.clean_samples:,} samples = "
                     f"{10_000 * len(onsets) / args.clean_samples:.2f} per 10,000 samples"
                     f"{_leaders(leaders, ' (') if mode == 'drift' else ''}")
    clean_est = " / ".join(f"{100 * estimated_drop(recorded['clean_logits'], name):+.1f}" for name in ESTIMATORS)
    names = " / ".join(ESTIMATORS)
    lines += ["", f"clean stream: true accuracy {100 * clean_acc:.1f} % vs {100 * estimate.validation_accuracy:.1f} "
              f"% validation ({100 * (estimate.validation_accuracy - clean_acc):+.1f} points); estimated drop "
              f"{clean_est} ({names})", "",
              f"| data | accuracy drop (points) | estimated drop {names} | "
              + " | ".join(f"{name} alert within 500; median samples" for name in ESTIMATORS)
              + " | drift within 500 (warning) | drift channels (most often first) |",
              "| --- | ---: | ---: | " + "---: | " * len(ESTIMATORS) + "---: | --- |"]
    for name, (rows, accuracy, logits) in recorded["shifted"].items():
        drop = "n/a (other labels)" if accuracy is None else f"{100 * (clean_acc - accuracy):.1f}"
        estimated = " / ".join(f"{100 * estimated_drop(logits, name):.1f}" for name in ESTIMATORS)
        cells, drift_leaders = [], {}
        for mode, monitor in monitors.items():
            firsts, leaders = [], {}
            shifted_rows = with_hits(rows, logits, mode)
            for _ in range(args.trials):
                found = replay(monitor, shifted_rows, 500, args.batch, generator, stop_at_alert=True, leaders=leaders)
                firsts += found[:1]
            median = f"{statistics.median(firsts):.0f}" if firsts else "-"
            rate = f"{100 * len(firsts) / args.trials:.0f} %"
            cells.append(rate if mode == "drift" else f"{rate}; {median}")
            if mode == "drift":
                drift_leaders = leaders
        lines.append(f"| {name} | {drop} | {estimated} | {' | '.join(cells)} | {_leaders(drift_leaders)} |")
    lines += ["", f"{record_module.cpu_line()}; torch {torch.__version__}; features recorded in {seconds:.0f} s"]
    return "\n".join(lines)


def _leaders(leaders: dict, prefix: str = "") -> str:
    if not leaders:
        return ""
    text = ", ".join(f"{k} ({v})" for k, v in sorted(leaders.items(), key=lambda kv: -kv[1])[:3])
    return f"{prefix}{text})" if prefix else text


if __name__ == "__main__":
    main()
