"""How much of an int4 encoder's error the nearest-neighbour agreement tolerates (issue 9, MiniLM goals).

The held-out sentence embeddings of the float model E and of the int4 file Q are blended,
X = normalize(E + a (Q - E)), for shrinking a: the same error direction, a times its size. For each
a it prints the mean cosine of X to E and the top-1 nearest-neighbour agreement of X with E, so
the cosine that a given agreement needs can be read off for this model and this text.

Usage:
    .venv/bin/python -m benchmarks.embedding_agreement_vs_error RUN_DIR/model.safetensors \\
        [--recipe recipes/minilm_w4_kd.yaml] [recipe overrides ...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qat
from qat.recipe import load_recipe
from qat.run.build import build
from qat.run.models import load_float_model
from qat.tasks import EmbeddingTask, nearest_neighbours

SCALES = (1.0, 0.75, 0.5, 0.35, 0.25, 0.1)


def sentence_embeddings(model: torch.nn.Module, batches) -> torch.Tensor:
    """The embedding task's sentence embeddings (mean-pooled, L2-normalized) of every batch, (N, H)."""
    task = EmbeddingTask()
    with torch.no_grad():
        return torch.cat([task.forward(model, batch) for batch in batches])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the int4 file of an encoder run")
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, ["logging.wandb=disabled", "logging.progress_bar=false",
                                       "logging.run_dir=/tmp/qat-agreement", *args.overrides])
    run = build(recipe)
    run.datamodule.setup("fit")
    batches = list(run.datamodule.val_dataloader())
    reference = sentence_embeddings(load_float_model(recipe).eval(), batches)
    quantized = sentence_embeddings(qat.load(args.file), batches)
    expected = nearest_neighbours(reference)
    print(f"{reference.shape[0]} held-out sentences; error scale a: cosine to float, NN agreement")
    print("| a | cosine | NN agreement |\n| --- | --- | --- |")
    for scale in SCALES:
        blend = F.normalize(reference + scale * (quantized - reference), dim=-1)
        cosine = float((blend * reference).sum(-1).mean())
        agreement = float((nearest_neighbours(blend) == expected).float().mean())
        print(f"| {scale} | {cosine:.4f} | {agreement:.3f} |")


if __name__ == "__main__":
    main()
