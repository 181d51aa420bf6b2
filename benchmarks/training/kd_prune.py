"""Accuracy and size of FP, QAT, QAT+2:4, QAT+KD and QAT+KD+2:4 on digits, over several seeds.

    .venv/bin/python benchmarks/training/kd_prune.py --seeds 0 1 2   # writes kd_prune.json beside it, prints the tables

Every configuration trains 575 steps (25 epochs) from the same seed: the first 230 steps
(FP warm-up) are the same computation in all of them, so the float model at step 230 is a
common reference, and the teacher of the KD runs. Digits validation accuracy saturates
near 100% (360 images: one error is 0.28%), so the table also gives the validation loss
(NLL), the expected calibration error, and top-1 agreement and KL(reference || model)
against that FP reference. Sizes are files on disk: the float model as fp32 safetensors,
the others as the qat int4 export; the 2:4 rows also give an estimate (not a file) of the
int4 file with the pruned layers stored 2:4-compressed (2 of 4 values at 4 bits plus a
2-bit index each: 3 bits per weight instead of 4, scales unchanged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import record  # noqa: E402
from qat.data.loading import main_validation_loader  # noqa: E402
from qat.distill import kd_logit_loss  # noqa: E402
from qat.lightning.distillation import float_copy, weights_sha256  # noqa: E402
from qat.lightning.module import QATModule  # noqa: E402
from qat.recipe import load_recipe  # noqa: E402
from qat.run.build import build  # noqa: E402
from qat.run.export import export_run  # noqa: E402
from qat.run.train import summarize  # noqa: E402

DIGITS, KD24 = ROOT / "recipes" / "digits_w4a4.yaml", ROOT / "recipes" / "digits_w4a4_kd24.yaml"
CONFIGS = {
    "FP": (DIGITS, ["schedule.warmup_steps=100000", "export.enabled=false"]),
    "QAT": (DIGITS, ["export.enabled=true"]),
    "QAT+2:4": (KD24, ["distill.enabled=false"]),
    "QAT+KD": (KD24, ["prune.enabled=false"]),
    "QAT+KD+2:4": (KD24, []),
}


class Reference(pl.Callback):
    """Keeps a float copy of the model at the end of FP warm-up (the common reference)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.model = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.model is None:
            self.model = float_copy(pl_module.model).eval()


@torch.no_grad()
def versus_reference(model, reference, loader) -> dict[str, float]:
    """Top-1 agreement and KL(reference || model) over the validation set."""
    model.eval()
    agree, kl, count = 0, 0.0, 0
    for x, _ in loader:
        logits, ref = model(x), reference(x)
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        kl += float(kd_logit_loss(logits, ref, 1.0)) * len(x)
        count += len(x)
    return {"agreement": agree / count, "kl_to_fp": kl / count}


def packed_bytes_of_pruned(run) -> int:
    """Bytes of the int4 codes of the pruned layers (what 2:4 compression would shrink by a quarter)."""
    if run.pruning is None:
        return 0
    return sum(run.model.get_submodule(name).weight.numel() // 2 for name in run.pruning.layers)


def one_run(config: str, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """Train one configuration with one seed; its figures as a dict."""
    path, overrides = CONFIGS[config]
    recipe = load_recipe(path, [*extra, *overrides, f"trainer.seed={seed}", f"data.args.seed={seed}",
                                "logging.wandb=disabled", "logging.progress_bar=false",
                                f"logging.run_dir={run_dir}", f"logging.name={config.replace(':', '')}_s{seed}"])
    reference = Reference(load_recipe(KD24, extra).schedule.warmup_steps)
    run = build(recipe, [reference])
    start = time.perf_counter()
    run.trainer.fit(run.module, datamodule=run.datamodule, weights_only=True)
    summary = summarize(run, time.perf_counter() - start)
    final = summary.get("qat") or summary["final_float"]
    row = {"config": config, "seed": seed, "acc": final["acc"], "loss": final["loss"], "ece": final["ece"],
           "seconds": summary["seconds"], "reference_sha256": weights_sha256(reference.model)}
    row.update(versus_reference(run.model, reference.model, main_validation_loader(run.datamodule)))
    ref = QATModule(reference.model, recipe.task, 10).evaluate(main_validation_loader(run.datamodule))
    row.update(ref_acc=ref["acc"], ref_loss=ref["loss"], ref_ece=ref["ece"])
    if recipe.export.enabled:
        exported = export_run(run)
        row.update(int4_acc=exported["int4"]["acc"], file_bytes=exported["export"]["file_bytes"])
        row["file_bytes_24_estimate"] = row["file_bytes"] - packed_bytes_of_pruned(run) // 4
    else:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / "fp32.safetensors"
            state = {k: v.float().contiguous() for k, v in float_copy(run.model).state_dict().items()}
            safetensors.torch.save_file(state, str(file))
            row["file_bytes"] = file.stat().st_size
    if run.pruning is not None:
        row["sparsity"] = run.pruning.report(run.model).total
    return row


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| config | val acc % | int4 file acc % | val NLL | ECE % | agreement with FP % | KL to FP | "
            "size (bytes) | vs fp32 |")
    lines = [head, "|" + " --- |" * 9]
    fp_bytes = statistics.mean(r["file_bytes"] for r in rows if r["config"] == "FP")
    refs = [r for r in rows if r["config"] == "FP"]
    ref_cells = [mean_std([r["ref_acc"] for r in refs], 100), "-", mean_std([r["ref_loss"] for r in refs], 1, 4),
                 mean_std([r["ref_ece"] for r in refs], 100), "100", "0", f"{int(fp_bytes):,}", "1.00x"]
    lines.append("| FP at end of warm-up (reference, KD teacher) | " + " | ".join(ref_cells) + " |")
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        size = int(statistics.mean(r["file_bytes"] for r in mine))
        size_text = f"{size:,}" + (f" (2:4-packed est. {int(mine[0]['file_bytes_24_estimate']):,})"
                                   if "sparsity" in mine[0] else "")
        int4 = mean_std([r["int4_acc"] for r in mine], 100) if "int4_acc" in mine[0] else "-"
        cells = [mean_std([r["acc"] for r in mine], 100), int4, mean_std([r["loss"] for r in mine], 1, 4),
                 mean_std([r["ece"] for r in mine], 100), mean_std([r["agreement"] for r in mine], 100),
                 mean_std([r["kl_to_fp"] for r in mine], 1, 4), size_text, f"{fp_bytes / size:.2f}x"]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(rows: list[dict]) -> str:
    """One line per run (training seconds stay in the JSON: the machine is shared, they are not comparable)."""
    lines = ["| config | seed | acc % | NLL | ECE % | agreement % | KL to FP | sparsity |", "|" + " --- |" * 8]
    for r in rows:
        lines.append(f"| {r['config']} | {r['seed']} | {100 * r['acc']:.2f} | {r['loss']:.4f} | {100 * r['ece']:.2f}"
                     f" | {100 * r['agreement']:.2f} | {r['kl_to_fp']:.4f} | {r.get('sparsity', 0):.3f} |")
    return "\n".join(lines)


def machine() -> str:
    return f"{record.machine()}, lightning {pl.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_kd_prune"))
    parser.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    parser.add_argument("--extra", nargs="*", default=[], help="recipe overrides for every run")
    parser.add_argument("--tables-only", action="store_true", help="print the tables of an existing --json file")
    args = parser.parse_args()
    if args.tables_only:
        recorded = json.loads(Path(args.json).read_text())
        rows, host, command = recorded["rows"], recorded["machine"], recorded.get("command", "not recorded")
    else:
        rows, host, command = [], machine(), record.command()
        for seed in args.seeds:
            for config in args.configs:
                rows.append(one_run(config, seed, Path(args.run_dir), args.extra))
                print(json.dumps(rows[-1]), flush=True)
                Path(args.json).write_text(json.dumps({"machine": host, "command": command, "extra": args.extra,
                                                       "rows": rows}, indent=1))
    seeds = sorted({r["seed"] for r in rows})
    same = all(len({r["reference_sha256"] for r in rows if r["seed"] == s}) == 1 for s in seeds)
    print(f"machine: {host}\ncommand: `{command}`\nFP warm-up identical across configs of a seed: {same}\n")
    print(table(rows) + "\n\n" + per_seed(rows))


if __name__ == "__main__":
    main()
