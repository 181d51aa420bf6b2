"""What plain weight formats score on the encoder recipe's held-out sentences (MiniLM).

The float model's weights (every 2-D tensor but the token-type table: the recipe's int4 scope) are
rounded once, with no data and no training, to fp16 / bf16 and to round-to-nearest integer formats
(asymmetric, MSE range search: the recipe's `init`), per output channel and in groups of 128. For each it
prints the mean cosine to the float sentence embeddings, top-1 nearest-neighbour agreement, pair RMSE
and NN rank (see `benchmarks.models.common`), and optionally the same for int4 files: a scale
on which to read the recipe's figures and its goals.

`--margins T ...` adds a second table: NN agreement over the sentences whose float nearest neighbour beats
the second nearest by at least T in cosine (the float model's own margin), for each T. Near-ties of the float
model are where any rounding flips the nearest neighbour, int8 included.

Usage:
    .venv/bin/python -m benchmarks.models.embedding_agreement_references [--files RUN_DIR/model.safetensors ...]
        [--margins 0 0.002 0.005 0.01 0.02] [--recipe recipes/minilm_w4_kd.yaml] [--threads 2] [overrides ...]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterator

import torch

import qat
from benchmarks import record
from benchmarks.models.common import held_out_reference, row_printer
from qat.config import QuantizerConfig
from qat.functional import fake_quantize
from qat.observers import make_observer, to_rows
from qat.tasks import nearest_neighbours

KEPT_FLOAT = ("token_type_embeddings",)  # the recipe's rule: that 2 x 384 table stays float


def round_to_nearest(bits: int, granularity: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Weight (N, K) -> its asymmetric `bits`-bit round-to-nearest value, MSE-searched range per channel or
    per group of 128."""
    config = QuantizerConfig(bits=bits, symmetric=False, granularity=granularity, group_size=128, init="mse")

    def rounded(weight: torch.Tensor) -> torch.Tensor:
        rows = to_rows(weight, granularity, config.group_size)  # (scales, elements per scale)
        observer = make_observer(config, (rows.shape[0],))
        observer.update(rows)
        scale, zero = observer.qparams()
        return fake_quantize(rows, scale[:, None], zero[:, None], config.qmin, config.qmax).reshape(weight.shape)

    return rounded


def formats() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp16": lambda w: w.half().float(), "bf16": lambda w: w.bfloat16().float()}
    for bits in (8, 6, 5, 4):
        table[f"int{bits} per channel"] = round_to_nearest(bits, "channel")
        table[f"int{bits} g128"] = round_to_nearest(bits, "group")
    return table


@torch.no_grad()
def rounded_copy(model: torch.nn.Module, rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` whose 2-D weights (the token-type table excepted) went through `rounding`."""
    copied = copy.deepcopy(model)
    for name, parameter in copied.named_parameters():
        if parameter.dim() == 2 and not any(part in name for part in KEPT_FLOAT):
            parameter.copy_(rounding(parameter))
    return copied.eval()


def top1_margins(reference: torch.Tensor) -> torch.Tensor:
    """(N,) each unit-norm embedding's cosine to its nearest other embedding less that to its second nearest."""
    similarity = reference @ reference.T
    similarity.fill_diagonal_(-2.0)
    best, second = similarity.topk(2, dim=-1).values.unbind(-1)
    return best - second


def agreement_by_margin(expected: torch.Tensor, margins: torch.Tensor, embeddings: torch.Tensor,
                        thresholds: list[float]) -> list[float]:
    """Top-1 NN agreement of `embeddings` with the float model's neighbours `expected` (N,) over the sentences
    whose float margin (`top1_margins`, (N,)) is at least each threshold."""
    agree = nearest_neighbours(embeddings) == expected
    return [float(agree[margins >= t].float().mean()) for t in thresholds]


def candidates(teacher: torch.nn.Module, files: list[str]) -> Iterator[tuple[str, torch.nn.Module]]:
    """(label, model) of every plain format, then of every int4 file, built one at a time."""
    for label, rounding in formats().items():
        yield f"{label}, round-to-nearest", rounded_copy(teacher, rounding)
    for file in files:
        yield f"`{file}`", qat.load(file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help="int4 files of encoder runs, measured alongside")
    parser.add_argument("--margins", nargs="*", type=float, default=[],
                        help="also NN agreement over the sentences whose float top-1 margin is at least each of these")
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, teacher, reference = held_out_reference(args.recipe, args.overrides, "/tmp/qat-agreement-references")
    print(record.header())
    print(f"{reference.shape[0]} held-out sentences\n| weights | cosine | NN agreement | pair RMSE | NN rank |\n"
          f"| --- | --- | --- | --- | --- |")
    row = row_printer(reference, batches)
    expected, margins = nearest_neighbours(reference), top1_margins(reference)
    by_margin = []
    for label, model in candidates(teacher, args.files):
        embeddings = row(label, model)
        if args.margins:
            by_margin.append((label, agreement_by_margin(expected, margins, embeddings, args.margins)))
    if by_margin:
        quantiles = ", ".join(f"{q:.0%} {float(margins.quantile(q)):.4f}" for q in (0.1, 0.25, 0.5))
        print(f"\nNN agreement by the float model's top-1 margin (quantiles: {quantiles})\n| weights | "
              + " | ".join(f"margin >= {t} ({int((margins >= t).sum())})" for t in args.margins) + " |")
        print("| --- " * (len(args.margins) + 1) + "|")
        for label, values in by_margin:
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
