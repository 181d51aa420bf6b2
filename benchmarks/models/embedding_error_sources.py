"""Where an int4 encoder file's error sits (MiniLM): the file's tensors put back to float by group.

The float model gets every quantized tensor of the int4 file (dequantized) and every float parameter the
run trained (LayerNorms, biases); then one group of tensors at a time goes back to the float model's own
values (the word embeddings, each layer's Linears, each kind of Linear across layers, all Linears, the
trained float parameters). For each model it prints, on the recipe's held-out sentences: the mean cosine
to the float sentence embeddings, top-1 nearest-neighbour agreement, the pair RMSE (off-diagonal RMS
difference of the pairwise-cosine matrices) and the NN rank (mean rank of the float model's nearest
neighbour among the model's; 0 = always top-1). The last two move smoothly where NN agreement jumps.

Usage:
    .venv/bin/python -m benchmarks.models.embedding_error_sources RUN_DIR/model.safetensors [--file-only]
        [--recipe recipes/minilm_w4_kd.yaml] [--threads 2] [recipe overrides ...]
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable

import torch

import qat
from benchmarks import record
from benchmarks.models.common import held_out_reference, row_printer

LINEAR_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")


def reverted_groups(quantized: set[str], layers: int) -> dict[str, Callable[[str], bool]]:
    """{label: does this state key go back to float?} for the groups the table shows."""
    groups: dict[str, Callable[[str], bool]] = {
        "word embeddings": lambda k: k == "embeddings.word_embeddings.weight",
        "word + position embeddings": lambda k: k in quantized and k.startswith("embeddings."),
    }
    for i in range(layers):
        groups[f"layer {i} Linears"] = lambda k, i=i: k in quantized and k.startswith(f"encoder.layer.{i}.")
    for kind in LINEAR_KINDS:
        pattern = re.compile(rf"encoder\.layer\.\d+\.{re.escape(kind)}\.weight")
        groups[f"all {kind}"] = lambda k, p=pattern: k in quantized and p.fullmatch(k) is not None
    groups["all Linears"] = lambda k: k in quantized and k.startswith("encoder.")
    return groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the int4 file of an encoder run")
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("--file-only", action="store_true", help="only the file's own figures")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, teacher, reference = held_out_reference(args.recipe, args.overrides, "/tmp/qat-error-sources")
    loaded = qat.load(args.file)
    print(record.header())
    print(f"{reference.shape[0]} held-out sentences\n| int4 everywhere, except ... | cosine | NN agreement | "
          f"pair RMSE | NN rank |\n| --- | --- | --- | --- | --- |")
    row = row_printer(reference, batches)
    row("nothing (the file, `qat.load`)", loaded)
    if args.file_only:
        return
    float_state = teacher.state_dict()
    dequantized = {f"{name}.weight": module.dequantized_weight().detach()
                   for name, module in loaded.named_modules() if hasattr(module, "dequantized_weight")}
    file_state = loaded.state_dict()
    trained_float = {k: file_state[k] for k in float_state if k in file_state and k not in dequantized}

    def model_with(reverted: Callable[[str], bool]) -> torch.nn.Module:
        state = {**float_state, **trained_float, **dequantized}
        state.update({k: float_state[k] for k in state if reverted(k)})
        model = copy.deepcopy(teacher)
        model.load_state_dict(state)
        return model

    row("nothing (dequantized into the float model)", model_with(lambda k: False))
    layers = len(getattr(getattr(teacher, "encoder", None), "layer", []))
    for label, reverted in reverted_groups(set(dequantized), layers).items():
        row(label, model_with(reverted))
    row("the trained float parameters (LayerNorms, biases)", model_with(lambda k: k in trained_float))


if __name__ == "__main__":
    main()
