"""Post-training rounding of an encoder recipe, no training: round-to-nearest vs GPTQ (MiniLM).

For each rounding it prepares the recipe's model, calibrates it on the recipe's first
`schedule.calibration_batches` training batches exactly as a run does at the end of warm-up (GPTQ on
the same batches), and prints the mean cosine to the float sentence embeddings and the top-1
nearest-neighbour agreement on the held-out sentences, with the seconds the rounding took.

Usage:
    .venv/bin/python -m benchmarks.models.ptq_rounding [--recipe recipes/minilm_w4_kd.yaml] [--damping 0.01 ...]
        [recipe overrides ...]   (e.g. schedule.gptq_act_order=true)
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmarks import record
from benchmarks.models.common import sentence_embeddings
from qat.control import calibrate, set_fake_quant
from qat.data.loading import main_validation_loader
from qat.ptq import gptq_round
from qat.recipe import load_recipe
from qat.run.build import build
from qat.run.models import load_float_model
from qat.tasks import nearest_neighbours


def measure(reference: torch.Tensor, model: torch.nn.Module, batches: list) -> tuple[float, float]:
    """(mean cosine, NN agreement) of `model`'s sentence embeddings against `reference`."""
    embeddings = sentence_embeddings(model.eval(), batches)
    cosine = float((embeddings * reference).sum(-1).mean())
    agreement = float((nearest_neighbours(embeddings) == nearest_neighbours(reference)).float().mean())
    return cosine, agreement


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("--damping", type=float, nargs="*", default=[0.01], help="GPTQ dampings to try")
    parser.add_argument("--skip-nearest", action="store_true", help="GPTQ rows only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, ["logging.wandb=disabled", "logging.progress_bar=false",
                                       "logging.run_dir=/tmp/qat-ptq-rounding", *args.overrides])
    float_model = load_float_model(recipe).eval()
    print(record.header())
    print("| rounding | cosine | NN agreement | rounding s |\n| --- | --- | --- | --- |")
    reference = None
    for damping in [*([] if args.skip_nearest else [None]), *args.damping]:
        run = build(recipe)
        run.datamodule.setup("fit")
        val_batches = list(main_validation_loader(run.datamodule))
        if reference is None:
            reference = sentence_embeddings(float_model, val_batches)
        batches = list(itertools.islice(iter(run.datamodule.train_dataloader()), recipe.schedule.calibration_batches))
        set_fake_quant(run.model, weights=True, activations=True)
        start = time.perf_counter()
        calibrate(run.model, batches)
        if damping is not None:
            gptq_round(run.model, batches, damping, recipe.schedule.gptq_act_order)
        seconds = time.perf_counter() - start
        cosine, agreement = measure(reference, run.model, val_batches)
        order = ", act-order" if recipe.schedule.gptq_act_order else ""
        label = "nearest" if damping is None else f"gptq{order}, damping {damping:g}"
        print(f"| {label} | {cosine:.4f} | {agreement:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
