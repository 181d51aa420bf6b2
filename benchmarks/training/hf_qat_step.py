"""QAT vs float fine-tuning on a real Hugging Face model: step time and peak memory on the same batch.

Each mode runs in its own child process (peak RSS is per process), the modes alternate over
`--rounds` rounds (the machine is shared and noisy: the ratio of medians is what counts):

    float   the pretrained model, AdamW on every parameter, next-token loss
    qat     the same model prepared with the recipe's quant spec (fake-quant weights; scales and zero points
            frozen when the recipe freezes them from step 0, `schedule.freeze_step: 0`, else learned)
    float_kd  float plus a frozen float teacher and the token-level KL (float fine-tuning with distillation)
    qat_kd  qat plus the float teacher and the token-level KL (the recipe's full training step; compare it
            with float_kd: both carry the teacher)

Usage:
    .venv/bin/python -m benchmarks.training.hf_qat_step recipes/smollm2_w4_kd.yaml \\
        --batch 4 --seq 256 --steps 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import record

MODES = ("float", "qat", "float_kd", "qat_kd")


def child(recipe_path: str, mode: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    from qat.recipe import load_recipe
    from qat.run.models import load_float_model

    torch.set_num_threads(threads)
    recipe = load_recipe(recipe_path)
    model = load_float_model(recipe)
    teacher = None
    if mode.endswith("_kd"):
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if mode.startswith("qat"):
        model = prepare_as_recipe(model, recipe)
    times = timed_steps(model, random_batch(model.config.vocab_size, batch, seq), steps, teacher)
    return {"mode": mode, "step_s": statistics.median(times[1:]), "peak_rss_mib": peak_rss_mib()}


def prepare_as_recipe(model: torch.nn.Module, recipe) -> torch.nn.Module:
    """The model prepared with the recipe's quant spec (fake-quant weights), its scales and zero points frozen
    when the recipe freezes them from step 0, as QuantizationSchedule does before the first step."""
    from qat.control import freeze
    from qat.swap import prepare

    model, _ = prepare(model, recipe.quant)
    if recipe.schedule.freeze_step == 0:
        freeze(model)
    return model


def random_batch(vocab_size: int, batch: int, seq: int) -> dict:
    """The same random (batch, seq) token ids in every process (seed 0), all attended."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed_steps(model: torch.nn.Module, inputs: dict, steps: int, teacher: torch.nn.Module | None = None,
                cpu_times: list | None = None) -> list:
    """Wall seconds of steps + 1 training steps on `inputs` (the first warms up: allocations, optimizer state):
    forward, next-token loss (plus the token KL to `teacher`), backward, AdamW over the trainable parameters.
    `cpu_times`, when given, receives each step's CPU seconds of this process (all its threads): on a shared
    machine the work a step does, where the wall time also counts the other jobs' turns on the cores."""
    from qat.distill import token_kd_loss
    from qat.tasks import CausalLMTask

    task = CausalLMTask()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    for _ in range(steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = task.forward(model, inputs)
        loss = task.loss(logits, task.split(inputs)[1], inputs)
        if teacher is not None:
            with torch.no_grad():
                reference = task.forward(teacher, inputs)
            loss = loss + token_kd_loss(logits, reference, inputs["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_start)
    return times


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.recipe, args.child, args.batch, args.seq, args.steps, args.threads)))
        return
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, "-m", "benchmarks.training.hf_qat_step", args.recipe, "--child", mode,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
    from qat.recipe import load_recipe

    frozen = load_recipe(args.recipe).schedule.freeze_step == 0
    print(record.header())
    print(f"{args.threads} threads; batch {args.batch}x{args.seq}; {args.rounds} rounds of {args.steps} steps; "
          f"scales {'frozen' if frozen else 'learned'}")
    step = {mode: statistics.median(r["step_s"] for r in results[mode]) for mode in MODES}
    mem = {mode: statistics.median(r["peak_rss_mib"] for r in results[mode]) for mode in MODES}
    print("| mode | step s (median) | vs float | vs float_kd | peak RSS MiB | vs float | vs float_kd |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        print(f"| {mode} | {step[mode]:.2f} | {step[mode] / step['float']:.2f}x | {step[mode] / step['float_kd']:.2f}x "
              f"| {mem[mode]:.0f} | {mem[mode] / mem['float']:.2f}x | {mem[mode] / mem['float_kd']:.2f}x |")


if __name__ == "__main__":
    main()
