"""Training-step time with fake-quant on vs off, on CPU: side-by-side ratios in one run.

One step is forward + backward + AdamW step. "off" is the float model, "on" a prepared copy
with the same weights. Repetitions of the two alternate (on/off, then off/on, ...) so that
load from other processes hits both alike; the table reports medians and their ratio.

    .venv/bin/python -m benchmarks.training.train_step                  # writes benchmarks/training/train_step.md
    .venv/bin/python -m benchmarks.training.train_step --reps 10 --out -  # quick look, print only
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import record
from qat.config import QuantizerConfig, QuantSpec, default_activation_config
from qat.control import calibrate
from qat.models import DigitsCNN
from qat.swap import prepare

TARGET_RATIO = 1.3
# Findings kept with every regenerated table.
NOTES = """\
Before / after the rewrite of the LSQ autograd function in qat/ste.py (before: `git show f6fca4d:qat/ste.py`),
same script with `--reps 30 --threads 1`, two runs of each, back to back, load average about 5 on the 2 cores;
median paired on / off wall ratios:

| model | setting | before | after |
| --- | --- | ---: | ---: |
| MLP | W4 g128 | 1.45x, 1.48x | 1.10x, 1.24x |
| MLP | W4A8 | 1.73x, 1.67x | 1.22x, 1.37x |
| MLP | W4A8, input needs grad | 1.61x, 1.61x | 1.21x, 1.24x |
| Transformer block | W4 g128 | 1.08x, 1.12x | 1.04x, 1.06x |
| Transformer block | W4A8 | 1.54x, 1.57x | 1.15x, 1.18x |
| Transformer block | W4A8, input needs grad | 1.60x, 1.37x | 1.18x, 1.19x |

- What changed: on this CPU, comparisons that make bool tensors and `torch.where` ran 4-10x slower per element
  than float arithmetic (262k elements, 1 thread: `a == b` 140 us, `a - b` 34 us, `where` 156 us), and the
  old backward built 3 bool masks and 3 `where`s. Now the mask is a 0/1 float (`torch.eq` into a float
  buffer), the forward runs in place in one buffer, the backward reuses three buffers, and symmetric codes skip
  the zero-point passes. Results are bit-identical except the zero-point gradient's summation order.
- What is left in MLP W4A8 without input grad: the first layer's input gradient, a full matmul the float model
  skips (1 of 9 matmuls in the step) and the LSQ+ input scale needs; AdamW over 9 more small tensors (~0.35 ms).
- Threads: recorded with `--threads 1`. With torch's default of 2 threads on these 2 shared cores, OpenMP threads
  spin while other processes run, single steps took up to 50x longer and the medians meant nothing.
""".splitlines()
DEFAULT_OUT = Path(__file__).with_suffix(".md")


class MLP(nn.Module):
    """3 x Linear(512, 512) with ReLU between."""

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int = 256, heads: int = 4, hidden: int = 1024) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape  # (B, T, C)
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, width)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


W4 = QuantizerConfig(bits=4, group_size=128)
# (label, spec, whether the input needs its gradient as it does for a block inside a deeper model)
Setting = tuple[str, QuantSpec, bool]
SETTINGS: list[Setting] = [
    ("W4 g128", QuantSpec(weight=W4), False),
    ("W4A8", QuantSpec(weight=W4, activation=default_activation_config(8)), False),
    ("W4A8, input needs grad", QuantSpec(weight=W4, activation=default_activation_config(8)), True),
]


def default_recipe_settings() -> list[Setting]:
    """The default recipe's own spec (W4A4, per-channel convs), read from recipes/digits_w4a4.yaml."""
    from qat.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "digits_w4a4.yaml")
    return [("default recipe: W4A4", recipe.quant, False)]


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_input: Callable[[], Tensor]
    settings: Callable[[], list[Setting]] = lambda: SETTINGS


CASES = [
    Case("MLP 3x512, batch 256", MLP, lambda: torch.randn(256, 512)),
    Case("Transformer block d256 h4 mlp1024, seq 64, batch 16", Block, lambda: torch.randn(16, 64, 256)),
    Case("DigitsCNN (default recipe model), batch 64", DigitsCNN, lambda: torch.rand(64, 1, 8, 8),
         default_recipe_settings),
]


def make_step(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[], None]:
    """A closure running one training step of `model` on a fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(case: Case, spec: QuantSpec, input_grad: bool, reps: int, warmup: int) -> dict[str, float]:
    """Median wall times off / on, and medians of the paired on / off ratios (wall and CPU time)."""
    torch.manual_seed(0)
    float_model = case.make_model()
    quant_model, _ = prepare(copy.deepcopy(float_model), spec)
    x = case.make_input()
    target = torch.randn_like(float_model(x)).detach()
    calibrate(quant_model, [x])
    x.requires_grad_(input_grad)
    steps = {"off": make_step(float_model, x, target), "on": make_step(quant_model, x, target)}
    for _ in range(warmup):
        steps["off"]()
        steps["on"]()
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for rep in range(reps):
        for key in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            times[key].append(timed(steps[key]))
    pairs = list(zip(times["on"], times["off"], strict=True))
    return {
        "off": statistics.median(t[0] for t in times["off"]),
        "on": statistics.median(t[0] for t in times["on"]),
        "wall_ratio": statistics.median(on[0] / off[0] for on, off in pairs),
        "cpu_ratio": statistics.median(on[1] / off[1] for on, off in pairs),
    }


def run_table(reps: int, warmup: int) -> list[str]:
    rows = [
        "| model | setting | off (ms) | on (ms) | on / off | on / off, CPU time |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in CASES:
        for label, spec, input_grad in case.settings():
            m = measure(case, spec, input_grad, reps, warmup)
            rows.append(
                f"| {case.name} | {label} | {m['off'] * 1e3:.2f} | {m['on'] * 1e3:.2f} "
                f"| {m['wall_ratio']:.2f}x | {m['cpu_ratio']:.2f}x |"
            )
            print(rows[-1], flush=True)
    return rows


HEADER = """\
# Training step: fake-quant on vs off (CPU)

One step = forward + backward + AdamW step; off = the float model, on = the prepared copy with the
same weights. {reps} repetitions of each, interleaved (off/on, on/off, ...) after {warmup} warm-up steps.
off / on (ms): median wall times. on / off: median of the ratios of back-to-back pairs (robust to load
that drifts). CPU time: the same with the process's CPU time, which ignores time spent descheduled by
other processes on this shared machine.

'input needs grad': the batch requires its gradient in both models, as the input of a block inside a
deeper model does. Without it the float model skips the first layer's input gradient (a full matmul),
while the W4A8 model must compute it: the LSQ+ input quantizer's scale and zero point learn from it.

Target: on / off at most {target}x. Recorded, not asserted.
"""


def report(rows: list[str], args: argparse.Namespace, load_before: tuple, load_after: tuple) -> str:
    """The markdown file: header, table, notes, and the machine and command of this run."""
    run = [
        f"- machine: {record.machine()}",
        f"- load average (1/5/15 min) before: {load_before}, after: {load_after}; the machine is shared,"
        " so absolute times are noisy and only the side-by-side ratios are meant to be compared",
        f"- date: {record.now()}",
        f"- command: `{record.command()}`",
    ]
    header = HEADER.format(reps=args.reps, warmup=args.warmup, target=TARGET_RATIO)
    return "\n".join([header, *rows, "", *NOTES, "", "Run:", "", *run, ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions of each of on / off")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write, '-' for none")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = tuple(round(v, 2) for v in os.getloadavg())
    rows = run_table(args.reps, args.warmup)
    text = report(rows, args, load_before, tuple(round(v, 2) for v in os.getloadavg()))
    if args.out != "-":
        record.write(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
