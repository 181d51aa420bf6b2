"""Training cost: a qat QAT step beside a torchao QAT step (and float fine-tuning) on the same model and batch.

Each mode runs in its own child process (peak RSS is per process); the modes alternate over `--rounds` rounds,
so a shared, noisy machine loads them alike and the ratios of the medians are what count. Every mode takes the
same random (batch, seq) token ids, float32 weights and activations, the next-token loss and AdamW over its
trainable parameters (`benchmarks.training.hf_qat_step.timed_steps`, the step of that benchmark):

    float    the recipe's pretrained model, every parameter trained
    qat      the recipe's prepare: fake-quantized weights at its spec (SmolLM2: int4 g64 asymmetric LSQ+, every
             Linear and the tied embedding / head), scales and zero points frozen as the recipe freezes them
    torchao  torchao's QAT prepare at the recipe's group size: `QATConfig(Int4WeightOnlyConfig(group_size=g),
             step="prepare")` (`torchao_peer.qat_prepare`): every nn.Linear a FakeQuantizedLinear whose weight
             is fake-quantized to int4 per group (min / max grid recomputed every step), activations float

Usage (about 10 minutes on two cores for SmolLM2-135M at the defaults):
    .venv/bin/python -m benchmarks.peers.train_step [--recipe recipes/smollm2_w4_kd.yaml] \\
        [--batch 4 --seq 256 --steps 3 --rounds 3 --threads 1] [--output benchmarks/peers/train_step.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import record
from benchmarks.training.hf_qat_step import peak_rss_mib, prepare_as_recipe, random_batch, timed_steps

MODES = ("float", "qat", "torchao")


def prepared(mode: str, recipe) -> tuple[torch.nn.Module, str]:
    """The recipe's float model made ready to train in `mode`; and what was done, for the record."""
    from qat.run.models import load_float_model

    model = load_float_model(recipe)
    if mode == "float":
        return model, "no quantization"
    if mode == "qat":
        spec = recipe.quant.weight
        frozen = "frozen" if recipe.schedule.freeze_step == 0 else "learned"
        return prepare_as_recipe(model, recipe), (f"qat prepare: int{spec.bits} g{spec.group_size} "
                                                  f"{'sym' if spec.symmetric else 'asym'} {spec.quantizer}, "
                                                  f"scales {frozen}")
    if mode == "torchao":
        import torchao

        from benchmarks.peers import torchao_peer

        group = recipe.quant.weight.group_size
        torchao_peer.qat_prepare(model, group)
        return model, f"torchao {torchao.__version__} QATConfig(Int4WeightOnlyConfig(group_size={group}), 'prepare')"
    raise ValueError(f"mode {mode!r}; allowed: {MODES}")


def child(recipe_path: str, mode: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    """One mode's figures in this process: median step seconds (after a warm-up step), peak RSS, trainables."""
    from qat.recipe import load_recipe

    torch.set_num_threads(threads)
    model, what = prepared(mode, load_recipe(recipe_path))
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    cpu: list[float] = []
    times = timed_steps(model, random_batch(model.config.vocab_size, batch, seq), steps, cpu_times=cpu)
    return {"mode": mode, "step_s": statistics.median(times[1:]), "steps_s": times[1:],
            "cpu_s": statistics.median(cpu[1:]), "steps_cpu_s": cpu[1:],
            "peak_rss_mib": peak_rss_mib(), "trainable": trainable, "prepared": what}


def run_child(args: argparse.Namespace, mode: str) -> dict:
    """`child` in a fresh process: its last stdout line is the JSON result; a failure keeps its error."""
    cmd = [sys.executable, "-m", "benchmarks.peers.train_step", "--recipe", args.recipe, "--child", mode,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"mode": mode, "error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]]) -> str:
    """Medians over the rounds per mode (CPU seconds per step, wall seconds per step, peak RSS), each against
    float and against qat."""
    good = {mode: [r for r in runs if "error" not in r] for mode, runs in results.items()}
    medians = {key: {mode: statistics.median(r[key] for r in runs) for mode, runs in good.items() if runs}
               for key in ("cpu_s", "step_s", "peak_rss_mib")}
    lines = ["| mode | CPU s / step | vs float | vs qat | wall s / step | vs float | vs qat | peak RSS MiB | vs float "
             "| vs qat | each round's CPU s / wall s |",
             "| --- |" + " ---: |" * 9 + " --- |"]
    for mode, runs in results.items():
        if not good[mode]:
            lines.append(f"| {mode} | failed: {runs[0]['error']} |" + " |" * 9)
            continue
        cells = [f"{values[mode]:{'.0f' if key == 'peak_rss_mib' else '.2f'}} | {_ratio(values, mode, 'float')} | "
                 f"{_ratio(values, mode, 'qat')}" for key, values in medians.items()]
        rounds = ", ".join(f"{r['cpu_s']:.1f} / {r['step_s']:.1f}" for r in good[mode])
        lines.append(f"| {mode} | {' | '.join(cells)} | {rounds} |")
    return "\n".join(lines)


def _ratio(values: dict[str, float], mode: str, base: str) -> str:
    return f"{values[mode] / values[base]:.2f}x" if base in values else "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2_w4_kd.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--output", default=None, help="write the record to this markdown file")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.recipe, args.child, args.batch, args.seq, args.steps, args.threads)))
        return
    started, loads = time.perf_counter(), [os.getloadavg()[0]]
    results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            results[mode].append(run_child(args, mode))
            loads.append(os.getloadavg()[0])
            print(json.dumps(results[mode][-1]), flush=True)
    prepared_as = {mode: f"{runs[0]['prepared']}; {runs[0]['trainable'] / 1e6:.1f} M trainable parameters"
                   for mode, runs in results.items() if "prepared" in runs[0]}
    text = "\n".join([
        "# Training cost: a qat QAT step beside a torchao QAT step (and float fine-tuning)", "",
        record.header(time.perf_counter() - started), "",
        f"{args.threads} thread(s) per process; batch {args.batch} x {args.seq} random tokens; float32; AdamW; "
        f"{args.rounds} rounds of {args.steps} timed steps (after one warm-up step) per mode, each mode in its own "
        f"process, modes alternating; 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run.", "",
        table(results), "", "Modes:", "", *(f"- **{mode}**: {what}" for mode, what in prepared_as.items()), ""])
    print(text)
    if args.output:
        print(f"wrote {record.write(args.output, text)}")


if __name__ == "__main__":
    main()
