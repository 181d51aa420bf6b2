"""Generation speed of the self-generated distillation text (qat.data.generated) with SmolLM2-135M.

Generates `--sequences` sequences of `--length` tokens with the recipe's float model, for each `--dtypes`
entry (the sampler's copy: 'auto' is what a run picks on this machine, `qat.data.generated.sampler_dtype`),
in batches of each `--batch-sizes` entry (`qat.data.sampling` through
`qat.hf.batched_decoder.BatchedLlamaDecoder`: one preallocated KV cache, sampling at temperature 1.0 /
top-p 0.95, the first token uniform over the vocabulary), into a fresh temporary cache (nothing is read
from an earlier one), and writes tokens/s (every generated token counted, the drawn first one too) to
benchmarks/models/generation_speed.md. A second call on the same cache is timed as well: the cache hit.

Usage:
    .venv/bin/python -m benchmarks.models.generation_speed [--sequences 64] [--length 128]
        [--batch-sizes 16 32 64] [--dtypes float32 bfloat16] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import record
from qat.data.generated import GenerationSettings, _special_ids, generate_blocks, sampler_dtype, weights_digest
from qat.hf.load import load_tokenizer
from qat.recipe import load_recipe
from qat.run.models import load_float_model

RECIPE = "recipes/smollm2_w4_kd.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE, [])
    start = time.perf_counter()
    model = load_float_model(recipe).eval()
    excluded = _special_ids(load_tokenizer(recipe.model.hf))
    digest = weights_digest(model)
    print(f"model loaded and hashed in {time.perf_counter() - start:.1f} s")
    rows = []
    for dtype, batch in [(sampler_dtype(d), b) for d in args.dtypes for b in args.batch_sizes]:
        settings = GenerationSettings(seq_len=args.length, temperature=1.0, top_p=0.95, batch_size=batch, seed=0,
                                      dtype=dtype)
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            blocks = generate_blocks(model, args.sequences, settings, excluded_first_tokens=excluded, cache_root=root,
                                     progress=True, digest=digest)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            again = generate_blocks(model, args.sequences, settings, excluded_first_tokens=excluded, cache_root=root,
                                    progress=False, digest=digest)
            hit = time.perf_counter() - start
        assert torch.equal(blocks, again)
        tokens = blocks.numel()
        rows.append((dtype, batch, tokens, seconds, tokens / seconds, hit))
        print(f"{dtype} batch {batch}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s; "
              f"cache hit {hit:.2f} s")
    lines = ["# Self-generated distillation text: generation speed, SmolLM2-135M (CPU)", "",
             record.header(), "",
             f"{args.sequences} sequences x {args.length} tokens, sampled at temperature 1.0 / top-p 0.95, first "
             "token uniform over the vocabulary, end-of-sequence suppressed, a copy of the model in "
             f"each dtype sampling ('auto' picks {sampler_dtype('auto')} here; "
             "`qat.data.generated.generate_blocks`, "
             "`qat.data.sampling`'s decode loop through `qat.hf.batched_decoder.BatchedLlamaDecoder`), torch threads: "
             + str(torch.get_num_threads()) + ".", "",
             "| sampler dtype | generation batch | tokens | seconds | tokens/s | cache hit, seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {d} | {b} | {t} | {s:.1f} | {r:.0f} | {h:.2f} |" for d, b, t, s, r, h in rows]
    lines += ["", "Goal (issue 24): at least 500 tokens/s on this CPU, batched."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print(f"wrote {record.write(Path(__file__).with_suffix('.md'), text)}")


if __name__ == "__main__":
    main()
