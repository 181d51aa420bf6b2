"""Text generation from an int4 causal LM file: `qat generate FILE "prompt"`.

The file is loaded with `qat.load` (packed int4 layers, the fastest kernel available or
the one asked for); the tokenizer comes from the source the file records (its
`hf_source`), or from `--tokenizer`. Decoding is Hugging Face's `generate` with its KV
cache: greedy by default, sampling with `--sample` (temperature, top-k, top-p, seed).
Prefill and decode speeds are measured separately and printed.

Example:
    $ qat generate runs/smollm2_w4_kd/version_0/model.safetensors "def fibonacci(n):" --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from qat.hf.load import HFLoadError, HFSource, load_tokenizer


@dataclass
class Generation:
    """What `generate` produced and how fast."""

    text: str
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def tokenizer_for(path: str, tokenizer: Optional[str] = None) -> Any:
    """The tokenizer `--tokenizer` names, or the one of the source recorded in the int4 file."""
    if tokenizer is not None:
        return load_tokenizer(HFSource(path=tokenizer))
    from qat.export.manifest import read_manifest
    from qat.export.reader import read_header

    architecture = read_manifest(read_header(path)).architecture or {}
    source = architecture.get("hf_source")
    if not isinstance(source, dict):
        raise HFLoadError(f"{path} records no Hugging Face source to take the tokenizer from; pass --tokenizer")
    return load_tokenizer(HFSource(**source))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, seed: int = 0,
             chat: bool = False) -> Generation:
    """Continue `prompt` with `model` (a Hugging Face causal LM, e.g. from `qat.load`)."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, P)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization")
    options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.eos_token_id}
    if sample:
        torch.manual_seed(seed)
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    start = time.perf_counter()
    model(input_ids=ids)  # prefill alone, for its speed
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)  # (1, P + new)
    total = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    decode = max(total - prefill, 1e-9)
    return Generation(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), new,
                      ids.shape[1] / max(prefill, 1e-9), max(new - 1, 0) / decode)


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `qat generate`."""
    import qat

    try:
        tokenizer = tokenizer_for(args.file, args.tokenizer)
        model = qat.load(args.file, kernel_backend=args.backend)
        result = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.sample, args.temperature,
                          args.top_k, args.top_p, args.seed, args.chat)
    except (ValueError, FileNotFoundError) as err:
        print(f"qat generate: error: {err}", file=sys.stderr)
        return 1
    print(result.text)
    print(json.dumps({"new_tokens": result.new_tokens, "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 1),
                      "decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}), file=sys.stderr)
    return 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `qat generate FILE PROMPT`."""
    parser = subparsers.add_parser("generate", help="generate text from an int4 causal LM file",
                                   description="Load an int4 file written by qat export and continue a prompt "
                                   "(greedy, or sampling with --sample), with a KV cache.")
    parser.add_argument("file", help="a .safetensors file of a Hugging Face causal LM written by qat")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the source recorded in the file)")
    parser.add_argument("--backend", help="int4 kernel backend (default: dispatch chooses)")
    parser.set_defaults(func=run_generate)
    return parser
