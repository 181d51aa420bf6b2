"""Running a GGUF export in llama.cpp (through `llama-cpp-python`), token ids in, logits out.

Used by the tests that check `qat export --to gguf` against `qat.load`, and by the generation
benchmark that puts llama.cpp's tokens/s next to ours. Token ids go in directly, so a
comparison never depends on two tokenizers agreeing (that is checked separately).

Example:
    >>> llm = open_llama("smollm2-q4.gguf")
    >>> logits = llama_logits(llm, [1, 504, 2263])        # (3, vocab) float32
    >>> continuation = llama_greedy(llm, [1, 504, 2263], 16)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


def open_llama(path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None) -> Any:
    """A `llama_cpp.Llama` on the GGUF file `path` that keeps the logits of every position."""
    import llama_cpp

    threads = threads or torch.get_num_threads()
    return llama_cpp.Llama(os.fspath(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=n_ctx, logits_all=True, verbose=False)


def llama_logits(llm: Any, ids: Sequence[int]) -> Tensor:
    """Logits (T, vocab) of llama.cpp for the token ids `ids` from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@dataclass
class Greedy:
    """A greedy continuation and the time llama.cpp took for the prompt and the new tokens."""

    tokens: list[int]
    prefill_s: float
    decode_s: float

    def prefill_tokens_per_s(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return max(len(self.tokens) - 1, 1) / self.decode_s


def llama_greedy(llm: Any, ids: Sequence[int], new_tokens: int) -> Greedy:
    """The `new_tokens` greedy (argmax) continuation of `ids`, reusing llama.cpp's KV cache, timed.

    As in `qat.hf.generate`: prefill is the prompt's forward pass; decode is the time of the
    new tokens after the first (which the prefill's logits already give).
    """
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(ids))
    prefill = time.perf_counter() - start
    out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    start = time.perf_counter()
    while len(out) < new_tokens:
        llm.eval([out[-1]])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return Greedy(out, prefill, time.perf_counter() - start)
