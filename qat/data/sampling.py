"""Batched ancestral sampling from a causal LM for distillation text: temperature, then top-p (nucleus) over
the most probable candidates only, drawn from those candidates by inverse CDF (one uniform per row).

    nucleus          the top-p tokens of each row as (probabilities, token ids) over `candidates` columns:
                     `topk` finds the candidates, a full sort only for the rows whose candidates hold less
                     mass than `top_p` (the flat rows after a random first token); the kept set is the one
                     transformers' TopPLogitsWarper keeps
    sample_nucleus   one draw per row from its nucleus renormalised: a uniform in [0, kept mass) looked up
                     in the cumulative probabilities (no multinomial, whose exponential draw over every
                     column of every row cost 60 ms a step at batch 64), the short rows apart from the others
    sample_sequences the decode loop: one forward per new token, every sequence of a batch the same length
                     (no attention mask); Llama-architecture models through `BatchedLlamaDecoder` (one
                     preallocated KV cache), others through their own forward and KV cache; the
                     suppressed tokens (end of sequence) never drawn

Why its own loop rather than `generate`: at batch 64 SmolLM2-135M's bf16 decode on two CPU cores spent more
time in `generate`'s extras (a multinomial over all 49152 tokens of every row, the -inf scatter of the
filtered logits, the attention mask grown every step) and in the dynamic KV cache's per-step concatenation
than in the model's matmuls (benchmarks/models/generation_speed.md).

Example:
    >>> tokens = sample_sequences(model, first_tokens, new_tokens=255, temperature=1.0, top_p=0.95,
    ...                           suppressed=[eos_id])
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from qat.hf.batched_decoder import BatchedLlamaDecoder, unsupported_reason

__all__ = ["nucleus", "sample_nucleus", "sample_sequences"]


def _keep(ordered: Tensor, log_norm: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Probabilities of the descending logits `ordered`, zero outside the nucleus, and the mass `ordered` holds."""
    probs = (ordered - log_norm).exp()
    cumulative = probs.cumsum(-1)
    keep = (cumulative - probs) < top_p  # the mass before a token is under top_p: it is in the nucleus
    keep[:, 0] = True
    return torch.where(keep, probs, torch.zeros((), dtype=probs.dtype)), cumulative[:, -1]


def _nucleus_parts(logits: Tensor, top_p: float, candidates: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(probs, ids) over the candidates of every row, the short rows' indices, and their (probs, ids) fully
    sorted (empty when none is short)."""
    logits = logits.float()
    log_norm = logits.logsumexp(-1, keepdim=True)
    vocab = logits.shape[-1]
    none = torch.empty(0, dtype=torch.long, device=logits.device)
    if top_p >= 1.0:
        ids = torch.arange(vocab, device=logits.device).expand_as(logits)
        return (logits - log_norm).exp(), ids, none, logits[:0], none.reshape(0, vocab)
    ordered, ids = logits.topk(min(candidates, vocab), dim=-1)
    probs, mass = _keep(ordered, log_norm, top_p)
    short = (mass < top_p).nonzero().reshape(-1)
    if short.numel() == 0:
        return probs, ids, short, logits[:0], none.reshape(0, vocab)
    full_ordered, full_ids = logits[short].sort(dim=-1, descending=True)
    full_probs, _ = _keep(full_ordered, log_norm[short], top_p)
    return probs, ids, short, full_probs, full_ids


def nucleus(logits: Tensor, top_p: float, candidates: int = 1024) -> tuple[Tensor, Tensor]:
    """The nucleus of each row of float `logits` (B, V): (probs, ids), both (B, K), probs zero outside it.

    K is `candidates` (at most V) when every row's candidates hold at least `top_p` of its mass, else V
    (the short rows fully sorted, the others padded with zero-probability columns). top_p >= 1: all V."""
    probs, ids, short, full_probs, full_ids = _nucleus_parts(logits, top_p, candidates)
    if short.numel() == 0:
        return probs, ids
    pad = logits.shape[-1] - probs.shape[-1]
    probs = torch.nn.functional.pad(probs, (0, pad))
    ids = torch.nn.functional.pad(ids, (0, pad))
    probs[short], ids[short] = full_probs, full_ids
    return probs, ids


def _draw(probs: Tensor, ids: Tensor) -> Tensor:
    """One id per row, drawn with probability proportional to `probs` (B, K) by inverse CDF: (B, 1)."""
    cumulative = probs.cumsum(-1)
    total = cumulative[:, -1:]
    draw = torch.rand(probs.shape[0], 1, device=probs.device) * total
    index = torch.searchsorted(cumulative, draw, right=True)
    last = (cumulative < total).sum(-1, keepdim=True)  # the entry where the mass is complete (never a zero one)
    return ids.gather(-1, torch.minimum(index, last))


def sample_nucleus(logits: Tensor, top_p: float, candidates: int = 1024) -> Tensor:
    """One token per row of `logits` (B, V), drawn (global RNG) from its nucleus renormalised: (B, 1) int64.

    Rows whose candidates hold the nucleus draw from them; the short rows from their full sort (no row is
    widened to the vocabulary for the others' sake)."""
    probs, ids, short, full_probs, full_ids = _nucleus_parts(logits, top_p, candidates)
    tokens = _draw(probs, ids)
    if short.numel():
        tokens[short] = _draw(full_probs, full_ids)
    return tokens


@torch.no_grad()
def sample_sequences(model: nn.Module, first: Tensor, new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, suppressed: Sequence[int] = (), candidates: int = 1024) -> Tensor:
    """`first` (B, T0) continued by `new_tokens` sampled tokens: (B, T0 + new_tokens) int64 on `first`'s device.

    The model is a Hugging Face causal LM (a Llama-architecture one through `BatchedLlamaDecoder`, which fuses
    its projections in place; others called with `past_key_values`, `use_cache`, `logits_to_keep=1`);
    logits are divided by `temperature`, the `suppressed` ids are never drawn, then `sample_nucleus`."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    vocab_suppressed = None
    tokens = [first]
    step = _decoder(model, first.shape[0], first.shape[1] + new_tokens)
    logits = step(first)
    for index in range(new_tokens):
        logits = logits.float() / temperature
        if suppressed:
            if vocab_suppressed is None:
                vocab_suppressed = torch.tensor([i for i in suppressed if 0 <= i < logits.shape[-1]],
                                                dtype=torch.long, device=logits.device)
            logits.index_fill_(-1, vocab_suppressed, float("-inf"))
        token = sample_nucleus(logits, top_p, candidates)
        tokens.append(token)
        if index + 1 < new_tokens:
            logits = step(token)
    return torch.cat(tokens, dim=1)


def _decoder(model: nn.Module, batch_size: int, max_length: int) -> Callable[[Tensor], Tensor]:
    """A function from the next ids (B, P) of every row to the logits (B, V) after them, keeping the cache:
    `BatchedLlamaDecoder` for the models it runs, else the model's own forward with its KV cache."""
    if unsupported_reason(model) is None:
        return BatchedLlamaDecoder(model, batch_size, max_length).forward
    past = None

    def hf_step(ids: Tensor) -> Tensor:
        nonlocal past
        out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        return out.logits[:, -1, :]

    return hf_step
