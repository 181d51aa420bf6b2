"""Adversarial robustness of a finished run: float / PTQ / QAT / int4 file under L-inf FGSM and PGD.

Reads a run directory the way `qat eval` does (`qat.run.eval_sources.resolve`: recipe.yaml, float.safetensors,
checkpoints/last.ckpt, model.safetensors; PTQ calibrated again on the recipe's calibration batches), takes the
first `--examples` examples of the evaluation split (the test split where the data module has one), and
writes the report's adversarial tables (`qat.eval.adversarial.report_section`: white-box on each stage,
transfer from float) with the machine, the command and the time taken, and the plot next to them (.png).

    .venv/bin/python -m benchmarks.adversarial.from_run RUN_DIR [--eps 0.0078125 0.015625 ...] [--examples 512]
        [--steps 10] [--threads N] [--output benchmarks/adversarial/NAME.md]

--eps defaults to the recipe's `report.adversarial_eps`. Units are the model's inputs: the vision recipe's
(pixel - 127) / 128 makes 1/128 one grey level; the digits data module's pixel / 16, 1/16.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

import qat
from benchmarks import record
from qat.data.loading import calibration_loader, report_loader
from qat.eval.adversarial import report_section
from qat.eval.plots import adversarial_plot
from qat.eval.report import _adversarial_section
from qat.run.eval_sources import resolve
from qat.tasks import make_task


def leading(loader, examples: int) -> list:
    """The loader's first batches holding at least `examples` examples (the rest never loaded)."""
    taken, seen = [], 0
    for batch in loader:
        if seen >= examples:
            break
        taken.append(batch)
        seen += len(batch[1])
    return taken


def models_of(sources) -> dict[str, torch.nn.Module]:
    """float, PTQ (calibrated now), QAT (when the run has a checkpoint) and the int4 file, as the report has them."""
    recipe = sources.recipe
    data = sources.datamodule()
    calibration = list(itertools.islice(iter(calibration_loader(data)), recipe.schedule.calibration_batches))
    models = {"float": sources.float_model(), "ptq": sources.ptq_model(calibration)}
    qat_model = sources.qat_model()
    if qat_model is not None:
        models["qat"] = qat_model
    models["int4"] = qat.load(sources.int4_file(), device="cpu")
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--eps", type=float, nargs="+", help="attack sizes (default: the recipe's)")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: the recipe's trainer.cpu_threads)")
    parser.add_argument("--output", type=Path, help="the record (.md; the plot goes next to it as .png)")
    args = parser.parse_args()
    sources = resolve(args.run_dir)
    sources.data = sources.datamodule()  # set up once, for the calibration batches and the evaluation split
    recipe = sources.recipe
    threads = args.threads or recipe.trainer.cpu_threads
    if threads:
        torch.set_num_threads(threads)
    eps = args.eps or recipe.report.adversarial_eps
    if not eps:
        parser.error("no --eps and no report.adversarial_eps in the run's recipe")
    models = models_of(sources)
    split, loader = report_loader(sources.datamodule())
    task = make_task(recipe.task)
    batches = [task.split(batch) for batch in leading(loader, args.examples)]
    start = time.perf_counter()
    section = report_section(models, batches, eps, args.examples, args.steps)
    seconds = time.perf_counter() - start
    output = args.output or args.run_dir / "adversarial.md"
    plot = adversarial_plot({"adversarial": section}, output.with_suffix(".png"))
    lines = [f"# Adversarial robustness: {recipe.name} ({split} split)", "", record.header(seconds), "",
             f"Run: `{args.run_dir}`; {section['examples']} examples. Attacks and accuracy: {seconds:.0f} s for "
             f"{len(models)} stages, {len(eps)} eps, FGSM + PGD-{args.steps}.", "", f"![{plot.name}]({plot.name})", "",
             *_adversarial_section({"adversarial": section})[2:]]
    record.write(output, "\n".join(lines))
    print("\n".join(lines))
    print(f"written: {output}, {plot}")


if __name__ == "__main__":
    main()
