"""How much of an int4 encoder's error the nearest-neighbour agreement tolerates (MiniLM).

The held-out sentence embeddings of the float model E and of the int4 file Q are blended,
X = normalize(E + a (Q - E)), for shrinking a: the same error direction, a times its size. For each
a it prints the mean cosine of X to E and the top-1 nearest-neighbour agreement of X with E, so
the cosine that a given agreement needs can be read off for this model and this text.

Usage:
    .venv/bin/python -m benchmarks.models.embedding_agreement_vs_error RUN_DIR/model.safetensors \\
        [--recipe recipes/minilm_w4_kd.yaml] [recipe overrides ...]
"""

from __future__ import annotations

import argparse

import torch.nn.functional as F

import qat
from benchmarks import record
from benchmarks.models.common import held_out_reference, sentence_embeddings
from qat.tasks import nearest_neighbours

SCALES = (1.0, 0.75, 0.5, 0.35, 0.25, 0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the int4 file of an encoder run")
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    batches, _, reference = held_out_reference(args.recipe, args.overrides, "/tmp/qat-agreement")
    quantized = sentence_embeddings(qat.load(args.file), batches)
    expected = nearest_neighbours(reference)
    print(record.header())
    print(f"{reference.shape[0]} held-out sentences; error scale a: cosine to float, NN agreement")
    print("| a | cosine | NN agreement |\n| --- | --- | --- |")
    for scale in SCALES:
        blend = F.normalize(reference + scale * (quantized - reference), dim=-1)
        cosine = float((blend * reference).sum(-1).mean())
        agreement = float((nearest_neighbours(blend) == expected).float().mean())
        print(f"| {scale} | {cosine:.4f} | {agreement:.3f} |")


if __name__ == "__main__":
    main()
