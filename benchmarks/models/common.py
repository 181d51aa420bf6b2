"""What the encoder (MiniLM) benchmarks share: the recipe's held-out sentences and their figures.

`held_out_reference` builds an encoder recipe's data and float model and embeds the held-out
sentences; `agreement_figures` scores a model's embeddings against the float ones; `row_printer`
prints one markdown row of them per model. Used by embedding_agreement_vs_error.py,
embedding_error_sources.py, embedding_agreement_references.py and ptq_rounding.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qat.data.loading import main_validation_loader
from qat.recipe import load_recipe
from qat.run.build import build
from qat.run.models import load_float_model
from qat.tasks import EmbeddingTask, nearest_neighbours


def sentence_embeddings(model: torch.nn.Module, batches) -> torch.Tensor:
    """The embedding task's sentence embeddings (mean-pooled, L2-normalized) of every batch, (N, H)."""
    task = EmbeddingTask()
    with torch.no_grad():
        return torch.cat([task.forward(model, batch) for batch in batches])


def agreement_figures(reference: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """cosine, NN agreement, pair RMSE and NN rank of unit-norm `embeddings` (N, H) against `reference`."""
    count = reference.shape[0]
    expected = nearest_neighbours(reference)
    ref_sim, sim = reference @ reference.T, embeddings @ embeddings.T  # (N, N)
    off = ~torch.eye(count, dtype=torch.bool)
    to_expected = sim[torch.arange(count), expected]  # (N,) the model's cosine to the float nearest neighbour
    rank = (sim.masked_fill(~off, -2.0) > to_expected[:, None]).sum(-1).float()
    return {"cosine": float((embeddings * reference).sum(-1).mean()),
            "nn_agreement": float((nearest_neighbours(embeddings) == expected).float().mean()),
            "pair_rmse": float((ref_sim - sim)[off].square().mean().sqrt()),
            "nn_rank": float(rank.mean())}


def held_out_reference(recipe_path: str, overrides: list[str],
                       run_dir: str) -> tuple[list, torch.nn.Module, torch.Tensor]:
    """(held-out batches, float model, its sentence embeddings (N, H)) of an encoder recipe."""
    recipe = load_recipe(recipe_path, ["logging.wandb=disabled", "logging.progress_bar=false",
                                       f"logging.run_dir={run_dir}", *overrides])
    run = build(recipe)
    run.datamodule.setup("fit")
    batches = list(main_validation_loader(run.datamodule))  # the held-out sentences, not the eval domains
    teacher = load_float_model(recipe).eval()
    return batches, teacher, sentence_embeddings(teacher, batches)


def row_printer(reference: torch.Tensor, batches: list) -> Callable[[str, torch.nn.Module], torch.Tensor]:
    """A function printing one markdown row of `agreement_figures` for a model, under a label; it returns the
    model's sentence embeddings (N, H), for any further figure."""
    def row(label: str, model: torch.nn.Module) -> torch.Tensor:
        embeddings = sentence_embeddings(model.eval(), batches)
        f = agreement_figures(reference, embeddings)
        print(f"| {label} | {f['cosine']:.4f} | {f['nn_agreement']:.3f} | {f['pair_rmse']:.4f} | "
              f"{f['nn_rank']:.3f} |", flush=True)
        return embeddings
    return row
