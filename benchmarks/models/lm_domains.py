"""Perplexity of a causal-LM recipe's int4 files on several text domains, against two round-to-nearest
baselines: how much of the quantization gap each file recovers where it never trained.

Rows: the float model; round-to-nearest int4 of the recipe's spec with min-max group ranges (the baseline
other tools and outside checks call "RTN") and with the recipe's own `init` ranges (the `rtn` row of a run,
MSE ranges for the SmolLM2 recipe); each `--file LABEL=PATH` (an int4 file, or a run folder holding
its int4 file), loaded with `qat.load` (exact kernels). Columns: one per domain: the held-out end of
the recipe's training text, then each `--domains` entry (built-in corpora or files, as `data.eval_corpora`
takes them), `--tokens` tokens of evenly spaced blocks each. "% of gap" is 100 * (RTN - file) / (RTN - float)
per domain, against the min-max baseline (and the recipe-init one in brackets).

Usage:
    .venv/bin/python -m benchmarks.models.lm_domains [--recipe recipes/smollm2_w4_kd.yaml]
        [--file LABEL=PATH ...] [--domains debian:licenses sklearn:descr] [--tokens 8192] [--output FILE.md]
        [recipe overrides ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import record
from qat.control import set_fake_quant
from qat.data import TextDataModule
from qat.eval.evaluate import streamed_perplexity
from qat.export import load
from qat.export.inspect import int4_path
from qat.hf.load import load_tokenizer
from qat.recipe import load_recipe
from qat.run.models import build_model, load_float_model
from qat.tasks import make_task

TEXT_ARGS = ("files", "seq_len", "val_tokens", "val_fraction", "eos_id", "join_documents", "max_positions")


def data_module(recipe, domains: list[str], tokens: int) -> TextDataModule:
    """The recipe's text (user text only: generated blocks play no part in evaluation) with `domains`."""
    args = {key: value for key, value in dict(recipe.data.args).items() if key in TEXT_ARGS}
    dm = TextDataModule(load_tokenizer(recipe.model.hf), batch_size=4, eval_corpora=domains, eval_tokens=tokens,
                        **args)
    dm.setup("fit")
    return dm


def round_to_nearest(recipe_path: str, overrides: list[str], init: str | None) -> torch.nn.Module:
    """The recipe's model quantized with its spec, weights round-to-nearest with `init` ranges (None: the
    recipe's own), no calibration data, no training."""
    extra = [f"quant.weight.init={init}"] if init else []
    model, _ = build_model(load_recipe(recipe_path, [*overrides, *extra, "schedule.weight_rounding=nearest",
                                                         "schedule.gptq_act_order=false"]))
    set_fake_quant(model, weights=True, activations=False)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/smollm2_w4_kd.yaml")
    parser.add_argument("--file", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--domains", nargs="+", default=["debian:licenses", "sklearn:descr"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--output", default=None, help="write the table to this markdown file")
    args, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides)
    dm = data_module(recipe, args.domains, args.tokens)
    loaders = dict(zip(["held-out training text", *dm.eval_domains], dm.val_dataloader(), strict=True))
    batches = {name: list(loader) for name, loader in loaders.items()}
    task = make_task(recipe.task)
    models = {"float": lambda: load_float_model(recipe).eval(),
              "round-to-nearest, min-max ranges": lambda: round_to_nearest(args.recipe, overrides, "minmax"),
              f"round-to-nearest, recipe ranges ({recipe.quant.weight.init})":
                  lambda: round_to_nearest(args.recipe, overrides, None)}
    for entry in args.file:
        label, _, path = entry.partition("=")
        path = Path(path)
        models[label] = (lambda p=path: load(int4_path(p), device="cpu"))
    ppl: dict[str, dict[str, float]] = {}
    for label, make in models.items():
        model = make()
        with torch.no_grad():
            ppl[label] = {name: streamed_perplexity(model, b, task)[0] for name, b in batches.items()}
        print(label, {k: round(v, 3) for k, v in ppl[label].items()}, flush=True)
        del model
    names = list(batches)
    fp, minmax, own = (ppl[label] for label in list(models)[:3])

    def gap(row: dict[str, float], name: str) -> str:
        a = 100 * (minmax[name] - row[name]) / (minmax[name] - fp[name])
        b = 100 * (own[name] - row[name]) / (own[name] - fp[name])
        return f"{a:.0f} % ({b:.0f} %)"

    tokens = {name: sum(int(x["input_ids"].numel()) for x in b) for name, b in batches.items()}
    lines = [f"# {recipe.name}: perplexity by text domain", "", record.header(time.perf_counter() - start), "",
             "Domains: " + "; ".join(f"{name} ({tokens[name]} tokens)" for name in names) + ".", "",
             "| model | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for label in models:
        cells = [f"{ppl[label][n]:.2f}" + ("" if label in list(models)[:3] else f" ({gap(ppl[label], n)} of gap)")
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "% of gap: 100 * (RTN - file) / (RTN - float), RTN with min-max ranges (in brackets: with the "
              "recipe's own ranges)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        print(f"wrote {record.write(args.output, text)}")


if __name__ == "__main__":
    main()
