"""What plain weight formats score on the encoder recipe's held-out sentences (issue 9, MiniLM goals).

The float model's weights (every 2-D tensor but the token-type table: the recipe's int4 scope) are
rounded once, with no data and no training, to fp16 / bf16 and to round-to-nearest integer formats
(asymmetric, MSE range search: the recipe's `init`), per output channel and in groups of 128. For each it
prints the mean cosine to the float sentence embeddings, top-1 nearest-neighbour agreement, pair RMSE
and NN rank (see `benchmarks.embedding_error_sources`), and optionally the same for int4 files: a scale
on which to read the recipe's figures and its goals.

Usage:
    .venv/bin/python -m benchmarks.embedding_agreement_references [--files RUN_DIR/model.safetensors ...]
        [--recipe recipes/minilm_w4_kd.yaml] [--threads 2] [recipe overrides ...]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch

import qat
from benchmarks.embedding_error_sources import held_out_reference, row_printer
from qat.config import QuantizerConfig
from qat.functional import fake_quantize
from qat.observers import make_observer, to_rows

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help="int4 files of encoder runs, measured alongside")
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, teacher, reference = held_out_reference(args.recipe, args.overrides, "/tmp/qat-agreement-references")
    print(f"{reference.shape[0]} held-out sentences\n| weights | cosine | NN agreement | pair RMSE | NN rank |\n"
          f"| --- | --- | --- | --- | --- |")
    row = row_printer(reference, batches)
    for label, rounding in formats().items():
        row(f"{label}, round-to-nearest", rounded_copy(teacher, rounding))
    for file in args.files:
        row(f"`{file}`", qat.load(file))


if __name__ == "__main__":
    main()
