"""Text generation from an int4 causal LM file: `qat generate FILE "prompt"`.

The file is loaded with `qat.load` (packed int4 layers, the fastest kernel available or
the one asked for); the tokenizer comes from the source the file records (its
`hf_source`), or from `--tokenizer`. Two engines decode, greedy by default, sampling with
`--sample` (temperature, top-k, top-p, seed):

* `qat` (the default where it applies): `llama_decoder.LlamaDecoder`, fused projections and a
  preallocated KV cache, for Llama-layout models (Llama, Mistral, Qwen2);
* `hf`: Hugging Face's `generate` with its KV cache, for every causal LM.

`--engine auto` takes `qat` when the model is one it runs and `hf` otherwise. Prefill and
decode speeds are measured separately and printed.

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
from torch import Tensor, nn

import qat
from qat.export.manifest import read_manifest
from qat.export.reader import read_header
from qat.hf.llama_decoder import LlamaDecoder, unsupported_reason
from qat.hf.load import HFLoadError, load_tokenizer
from qat.recipe import HFSource

ENGINES = ("auto", "qat", "hf")


@dataclass
class Generation:
    """What `generate` produced and how fast."""

    text: str
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    engine: str = "hf"


def tokenizer_for(path: str, tokenizer: Optional[str] = None) -> Any:
    """The tokenizer `--tokenizer` names, or the one of the source recorded in the int4 file."""
    if tokenizer is not None:
        return load_tokenizer(HFSource(path=tokenizer))

    architecture = read_manifest(read_header(path)).architecture or {}
    source = architecture.get("hf_source")
    if not isinstance(source, dict):
        raise HFLoadError(f"{path} records no Hugging Face source to take the tokenizer from; pass --tokenizer")
    return load_tokenizer(HFSource(**source))


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ValueError naming the sampling setting that is out of range."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def pick_token(logits: Tensor, sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> int:
    """The next token from logits (V,): the argmax, or a draw after temperature, top-k and top-p filtering.

    Top-p keeps the most likely tokens whose cumulative probability before them is below top_p (so
    always at least one), as Hugging Face's sampling does.
    """
    if not sample:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(dim=-1)
        dropped = order[(probs.cumsum(dim=-1) - probs) >= top_p]
        logits[dropped] = float("-inf")
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def choose_engine(model: nn.Module, engine: str = "auto") -> str:
    """`qat` or `hf` for this model; `qat` asked for a model it cannot run raises with the reason."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    reason = unsupported_reason(model)
    if engine == "qat" and reason is not None:
        raise ValueError(f"the qat engine cannot run this model: {reason} (use --engine hf)")
    return "hf" if engine == "hf" or reason is not None else "qat"


def decoder_for(model: nn.Module, length: int) -> LlamaDecoder:
    """The model's LlamaDecoder (made once per model and kept with it), with room for `length` tokens."""
    decoder = getattr(model, "_qat_decoder", None)
    if decoder is None:
        decoder = LlamaDecoder(model, max_length=length)
        object.__setattr__(model, "_qat_decoder", decoder)  # a plain attribute, not a submodule
    decoder.reserve(length)
    return decoder


def _stop_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the model's generation config's EOS ids, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])


def _generate_qat(model: nn.Module, tokenizer: Any, ids: Tensor, max_new_tokens: int, sample: bool,
                  temperature: float, top_k: int, top_p: float, seed: int) -> Generation:
    decoder = decoder_for(model, ids.shape[1] + max_new_tokens)
    decoder.prepare()  # one-time kernel repacks and choices, outside the timings
    generator = torch.Generator().manual_seed(seed) if sample else None
    stop = _stop_ids(model, tokenizer)
    start = time.perf_counter()
    logits = decoder.prefill(ids[0])
    prefill = time.perf_counter() - start
    tokens: list[int] = []
    start = time.perf_counter()
    while True:
        tokens.append(pick_token(logits, sample, temperature, top_k, top_p, generator))
        if tokens[-1] in stop or len(tokens) == max_new_tokens:
            break
        logits = decoder.step(tokens[-1])
    decode = max(time.perf_counter() - start, 1e-9)
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens),
                      ids.shape[1] / max(prefill, 1e-9), (len(tokens) - 1) / decode, "qat")


def _generate_hf(model: nn.Module, tokenizer: Any, ids: Tensor, max_new_tokens: int, sample: bool,
                 temperature: float, top_k: int, top_p: float, seed: int) -> Generation:
    options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.eos_token_id}
    if sample:
        torch.manual_seed(seed)
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        options.update(temperature=None, top_k=None, top_p=None)
    # untimed: the first calls at a new number of rows choose kernels (and may time candidates: autotune.py), so
    # a timed prefill that paid for it could exceed the whole generate below (decode time <= 0)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{**options, "max_new_tokens": 2})
    start = time.perf_counter()
    model(input_ids=ids)  # prefill alone, for its speed
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)  # (1, P + new)
    total = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    decode = max(total - prefill, 1e-9)
    return Generation(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), new,
                      ids.shape[1] / max(prefill, 1e-9), max(new - 1, 0) / decode, "hf")


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, seed: int = 0,
             chat: bool = False, engine: str = "auto") -> Generation:
    """Continue `prompt` with `model` (a Hugging Face causal LM, e.g. from `qat.load`)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if sample:
        check_sampling(temperature, top_k, top_p)
    if chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, P)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization")
    run = _generate_qat if choose_engine(model, engine) == "qat" else _generate_hf
    return run(model, tokenizer, ids, max_new_tokens, sample, temperature, top_k, top_p, seed)


def check_language_model(model: nn.Module, path: str) -> None:
    """A ValueError naming the model's class when `path` holds no causal LM (e.g. the digits CNN of the
    default run): both engines need a Hugging Face causal LM, which has `generate`."""
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"{path} holds a {type(model).__name__} model, not a language model: qat generate "
                         "needs a Hugging Face causal LM exported by qat")


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `qat generate`."""
    try:
        model = qat.load(args.file, kernel_backend=args.backend)
        check_language_model(model, args.file)  # before the tokenizer: its error would hide this one
        tokenizer = tokenizer_for(args.file, args.tokenizer)
        result = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.sample, args.temperature,
                          args.top_k, args.top_p, args.seed, args.chat, args.engine)
    except (ValueError, FileNotFoundError) as err:
        print(f"qat generate: error: {err}", file=sys.stderr)
        return 1
    print(result.text)
    speeds = {"engine": result.engine, "new_tokens": result.new_tokens,
              "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 1),
              "decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}
    print(json.dumps(speeds), file=sys.stderr)
    return 0
