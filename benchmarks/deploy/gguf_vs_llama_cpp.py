"""A qat int4 Llama file against its GGUF conversion run by llama.cpp: same tokens, same next tokens?

For each prompt: whether llama.cpp's tokenizer (from the GGUF file) gives the Hugging Face
tokenizer's ids, the largest logit deviation relative to max |logit| (`qat.load`, reference
kernel, fp32 activations, as the expected side), the share of prompt positions whose argmax
agrees, and how many greedy tokens agree before the continuations part. `--text-tokens N`
adds the same comparison on the last N tokens of the default corpus (Python's pydoc topics,
the held-out end of the recipes' text).

Usage:
    .venv/bin/qat export runs/smollm2_w4_kd/version_0/model.safetensors --to gguf -o /tmp/smollm2-q4.gguf
    .venv/bin/python -m benchmarks.deploy.gguf_vs_llama_cpp runs/smollm2_w4_kd/version_0/model.safetensors \\
        /tmp/smollm2-q4.gguf --new-tokens 32
"""

from __future__ import annotations

import argparse

import torch

import qat
from benchmarks import record
from qat.export.targets.llama_cpp_run import llama_greedy, llama_logits, open_llama
from qat.hf.generate import tokenizer_for

PROMPTS = ("The for statement is used to iterate over the elements of a sequence",
           "Exceptions are raised when",
           "A dictionary maps keys to values; to add an item")


def text_agreement(model, llm, tokenizer, count: int) -> str:
    """Next-token argmax agreement and logit deviation on the last `count` tokens of the default corpus."""
    from qat.data.corpus import default_corpus

    ids = tokenizer(default_corpus())["input_ids"][-count:]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    got = llama_logits(llm, ids)
    agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    deviation = float((got - expected).abs().max() / expected.abs().max())
    return (f"last {count} tokens of the pydoc corpus: next-token argmax identical at {agreement:.1%} of "
            f"positions, logit deviation {deviation:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the qat int4 file")
    parser.add_argument("gguf", help="its `qat export --to gguf` conversion")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    model = qat.load(args.file, kernel_backend="reference")
    tokenizer = tokenizer_for(args.file)
    llm = open_llama(args.gguf, n_ctx=max(256, args.text_tokens))
    print(record.header())
    print("| prompt | same tokens | logit deviation | argmax agreement | greedy tokens equal |")
    print("| --- | --- | --- | --- | --- |")
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        same_tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0]
            ours = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                  top_k=None, top_p=None, temperature=None)[0, len(ids):].tolist()
        got = llama_logits(llm, ids)
        deviation = float((got - expected).abs().max() / expected.abs().max())
        agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
        theirs = llama_greedy(llm, ids, args.new_tokens).tokens
        equal = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
        print(f"| {prompt!r} | {same_tokens} | {deviation:.4f} | {agreement:.3f} | {equal} of {len(ours)} |")
    if args.text_tokens:
        print(text_agreement(model, llm, tokenizer, args.text_tokens))


if __name__ == "__main__":
    main()

