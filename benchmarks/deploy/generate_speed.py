"""End-to-end generation speed: the int4 file (qat.load) against the float model it came from.

Same prompt, greedy decoding of the same number of tokens, prefill and decode measured
separately (`qat.hf.generate`), each configuration `--rounds` times, interleaved (the
machine is shared: compare the medians side by side, not with other runs). The int4 file also
runs with int8 activations allowed for every dtype (QAT_INT8_ACTIVATIONS=all: the lean decoder's
activations are fp32, which the default policy keeps in float). Each model runs
with both engines: `hf` (Hugging Face generate) and `qat` (the lean Llama decoder). `--gguf FILE`
(repeatable) adds llama.cpp (llama-cpp-python, `make llama`) on that file with the same prompt tokens,
e.g. the `qat export --to gguf` conversion of the same int4 file, and llama.cpp's own Q4_0 of the float model.

Usage:
    .venv/bin/python -m benchmarks.deploy.generate_speed runs/smollm2_w4_kd/version_0/model.safetensors \\
        --new-tokens 32 --rounds 3 --threads 2 [--gguf smollm2-q4.gguf]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from qat.kernels import int8_act

import qat
from benchmarks import record
from qat.export.targets.llama_cpp_run import llama_greedy, open_llama
from qat.hf.generate import Generation, generate, tokenizer_for
from qat.hf.load import load_hf_model
from qat.recipe import HFSource

INT8_ALL = "int4, qat, QAT_INT8_ACTIVATIONS=all"
PROMPT = "The for statement is used to iterate over the elements of a sequence"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", action="append", default=[],
                        help="also run llama.cpp on this GGUF file (repeatable: e.g. llama.cpp's own Q4_0 beside ours)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from qat.export.manifest import read_manifest
    from qat.export.reader import read_header

    source = HFSource(**read_manifest(read_header(args.file)).architecture["hf_source"])
    tokenizer = tokenizer_for(args.file)
    float32 = load_hf_model(source).eval()
    bfloat16 = load_hf_model(HFSource(**{**source.to_json(), "dtype": "bfloat16"})).eval()
    int4 = qat.load(args.file, dtype=torch.float32)
    models = {  # name: (model, engine); the qat engine keeps its residual stream in fp32 whatever the weights
        "float fp32, hf": (float32, "hf"),
        "float fp32, qat": (float32, "qat"),
        "float bf16, hf": (bfloat16, "hf"),
        "float bf16 weights, qat": (bfloat16, "qat"),
        "int4 fp32, hf": (int4, "hf"),
        "int4 bf16, hf": (qat.load(args.file, dtype=torch.bfloat16), "hf"),
        "int4, qat": (int4, "qat"),
        # the lean decoder feeds its int4 layers fp32 activations, which the default policy keeps out of int8
        INT8_ALL: (qat.load(args.file, dtype=torch.float32), "qat"),
    }
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    llms = {"llama.cpp " + path: open_llama(path, n_ctx=256, threads=args.threads) for path in args.gguf}
    results: dict[str, list] = {name: [] for name in [*models, *llms]}
    texts = {}
    header = record.header()  # before the loop sets QAT_INT8_ACTIVATIONS, which the command line would then show
    for _ in range(args.rounds):
        for name, (model, engine) in models.items():
            os.environ[int8_act.ENV_VAR] = "all" if name == INT8_ALL else "bf16"
            out = generate(model, tokenizer, PROMPT, max_new_tokens=args.new_tokens, engine=engine)
            results[name].append(out)
            texts[name] = out.text
        for name, llm in llms.items():
            run = llama_greedy(llm, prompt_ids, args.new_tokens)
            results[name].append(Generation("", len(run.tokens), run.prefill_tokens_per_s(len(prompt_ids)),
                                            run.decode_tokens_per_s))
            texts[name] = tokenizer.decode(run.tokens, skip_special_tokens=True)
    print(header)
    print(f"prompt {len(tokenizer(PROMPT)['input_ids'])} tokens, {args.new_tokens} new tokens, {args.rounds} rounds")
    base = statistics.median(r.decode_tokens_per_s for r in results["float fp32, hf"])
    print("| model, engine | prefill tok/s | decode tok/s | decode vs float fp32 (hf) |")
    print("| --- | --- | --- | --- |")
    for name, runs in results.items():
        prefill = statistics.median(r.prefill_tokens_per_s for r in runs)
        decode = statistics.median(r.decode_tokens_per_s for r in runs)
        print(f"| {name} | {prefill:.0f} | {decode:.1f} | {decode / base:.2f}x |")
    for name, text in texts.items():
        print(f"{name}: {text!r}")


if __name__ == "__main__":
    main()
