"""Memory per rank of sharded (FSDP2) vs DDP QAT: 2 CPU processes over gloo, one run each.

Per rank, at the end of training: the bytes this rank holds for parameters, gradients and
optimizer state (a DTensor counts its local shard), and the process's peak resident set
(ru_maxrss: dominated by torch itself on a model this small, reported for honesty). FSDP2
keeps the whole parameters only inside a layer's forward/backward (all-gathered, then freed),
which the end-of-run count does not see; the peak RSS does. The recipe is TinyLM unless
`--recipe` names another; the other arguments are recipe overrides (applied after the run's own).
Prints the table for sharded_memory.md and records the figures in sharded_memory.json beside this script.

    .venv/bin/python -m benchmarks.training.sharded_memory                       # TinyLM (recipes/tinylm_w4.yaml)
    .venv/bin/python -m benchmarks.training.sharded_memory model.args.dim=256    # a wider TinyLM (recipe overrides)
    .venv/bin/python -m benchmarks.training.sharded_memory --recipe recipes/smollm2_w4_kd.yaml \\
        distill.enabled=false data.args.seq_len=128 data.args.batch_size=2 trainer.max_steps=4 ...  # SmolLM2-135M
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks import record

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_suffix(".json")
DEFAULT_RECIPE = "recipes/tinylm_w4.yaml"
RUN = ["trainer.max_steps=12", "trainer.checkpoint_every_n_steps=100", "schedule.warmup_steps=4",
       "schedule.calibration_batches=2", "data.args.batch_size=16", "trainer.devices=2", "logging.wandb=disabled",
       "logging.progress_bar=false", "trainer.limit_val_batches=2", "export.enabled=false"]


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for `tensor` (its shard when sharded)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class MemoryReport(pl.Callback):
    """Writes rank<R>.json with parameter / gradient / optimizer-state bytes and peak RSS at fit end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = list(pl_module.parameters())
        state = [t for s in trainer.optimizers[0].state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0]
        figures = {"params": sum(local_bytes(p) for p in params),
                   "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
                   "optimizer": sum(local_bytes(t) for t in state),
                   "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(figures))


def run_one(strategy: str, out_dir: Path, recipe_path: str, overrides: list[str]) -> None:
    """Entry of one 2-process run (Lightning relaunches this module for rank 1)."""
    from qat.recipe import load_recipe
    from qat.run.train import train

    recipe = load_recipe(ROOT / recipe_path,
                         [*RUN, f"trainer.strategy={strategy}", f"logging.run_dir={out_dir}", *overrides])
    train(recipe, extra_callbacks=[MemoryReport(out_dir)], quiet=True)


def measure(strategy: str, recipe_path: str, overrides: list[str]) -> tuple[list[dict], float]:
    """Per-rank figures of one 2-process run of `recipe_path` under `strategy`, and its wall time (s)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "benchmarks.training.sharded_memory", "--one", strategy, tmp, recipe_path,
               *overrides]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{strategy} run failed:\n{done.stderr[-3000:]}")
        wall = time.perf_counter() - start
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)], wall


def split_recipe(argv: list[str]) -> tuple[str, list[str]]:
    """(`--recipe PATH` or the TinyLM recipe, the remaining recipe overrides)."""
    if "--recipe" not in argv:
        return DEFAULT_RECIPE, argv
    at = argv.index("--recipe")
    if at + 1 >= len(argv):
        raise SystemExit("--recipe needs a path, e.g. --recipe recipes/smollm2_w4_kd.yaml")
    return argv[at + 1], argv[:at] + argv[at + 2:]


def record_key(recipe_path: str, overrides: list[str]) -> str:
    """The run's key in sharded_memory.json (TinyLM's keys are its overrides alone, as before)."""
    words = overrides if recipe_path == DEFAULT_RECIPE else [f"--recipe {recipe_path}", *overrides]
    return " ".join(words) or "default"


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| rank | figure | DDP (bytes) | FSDP2 (bytes) | FSDP2 / DDP |", "|---|---|---:|---:|---:|"]
    for rank in range(2):
        for key in ("params", "grads", "optimizer", "peak_rss"):
            ddp, fsdp = results["ddp"][rank][key], results["fsdp2"][rank][key]
            rows.append(f"| {rank} | {key} | {ddp:,} | {fsdp:,} | {fsdp / ddp:.3f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        run_one(argv[1], Path(argv[2]), argv[3], argv[4:])
        return
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    recipe_path, overrides = split_recipe(argv)
    results, walls = {}, {}
    for strategy in ("ddp", "fsdp2"):
        results[strategy], walls[strategy] = measure(strategy, recipe_path, overrides)
    text = (f"{record.header()}\n{record.now()}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
            f"recipe {recipe_path}, overrides: {' '.join(overrides) or 'none'}, "
            f"wall time ddp {walls['ddp']:.0f} s, fsdp2 {walls['fsdp2']:.0f} s\n\n" + table(results))
    print(text)
    recorded = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    RECORD.write_text(json.dumps({**recorded, record_key(recipe_path, overrides): results}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
