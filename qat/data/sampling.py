"""Batched ancestral sampling from a causal LM for distillation text: temperature, then top-p (nucleus) over
the most probable candidates only, drawn from those candidates (never a draw over the whole vocabulary).

    nucleus          the top-p tokens of each row as (probabilities, token ids) over `candidates` columns:
                     `topk` finds the candidates, a full sort only for the rows whose candidates hold less
                     mass than `top_p` (the flat rows after a random first token); the kept set is the one
                     transformers' TopPLogitsWarper keeps
    sample_sequences the decode loop: one forward per new token with the model's KV cache and no attention
                     mask (every sequence of a batch has the same length, so none is needed), the
                     suppressed tokens (end of sequence) never drawn

Why its own loop rather than `generate`: at batch 64 SmolLM2-135M's bf16 decode step takes about 0.12 s on
two CPU cores, and `generate` added as much again: a multinomial over all 49152 tokens of every row, the
-inf scatter of the filtered logits, the attention mask grown every step (benchmarks/models/generation_speed.md).

Example:
    >>> tokens = sample_sequences(model, first_tokens, new_tokens=255, temperature=1.0, top_p=0.95,
    ...                           suppressed=[eos_id])
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["nucleus", "sample_nucleus", "sample_sequences"]


def _keep(ordered: Tensor, log_norm: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Probabilities of the descending logits `ordered`, zero outside the nucleus, and the mass `ordered` holds."""
    probs = (ordered - log_norm).exp()
    cumulative = probs.cumsum(-1)
    keep = (cumulative - probs) < top_p  # the mass before a token is under top_p: it is in the nucleus
    keep[:, 0] = True
    return torch.where(keep, probs, torch.zeros((), dtype=probs.dtype)), cumulative[:, -1]


def nucleus(logits: Tensor, top_p: float, candidates: int = 1024) -> tuple[Tensor, Tensor]:
    """The nucleus of each row of float `logits` (B, V): (probs, ids), both (B, K), probs zero outside it.

    K is `candidates` (at most V) when every row's candidates hold at least `top_p` of its mass, else V
    (the short rows fully sorted, the others padded with zero-probability columns). top_p >= 1: all V."""
    logits = logits.float()
    log_norm = logits.logsumexp(-1, keepdim=True)
    vocab = logits.shape[-1]
    if top_p >= 1.0:
        return (logits - log_norm).exp(), torch.arange(vocab, device=logits.device).expand_as(logits)
    ordered, ids = logits.topk(min(candidates, vocab), dim=-1)
    probs, mass = _keep(ordered, log_norm, top_p)
    short = (mass < top_p).nonzero().reshape(-1)
    if short.numel() == 0:
        return probs, ids
    full_ordered, full_ids = logits[short].sort(dim=-1, descending=True)
    full_probs, _ = _keep(full_ordered, log_norm[short], top_p)
    pad = vocab - probs.shape[-1]
    probs = torch.nn.functional.pad(probs, (0, pad))
    ids = torch.nn.functional.pad(ids, (0, pad))
    probs[short], ids[short] = full_probs, full_ids
    return probs, ids


def sample_nucleus(logits: Tensor, top_p: float, candidates: int = 1024) -> Tensor:
    """One token per row of `logits` (B, V), drawn (global RNG) from its nucleus renormalised: (B, 1) int64."""
    probs, ids = nucleus(logits, top_p, candidates)
    return ids.gather(-1, torch.multinomial(probs, 1))


@torch.no_grad()
def sample_sequences(model: nn.Module, first: Tensor, new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, suppressed: Sequence[int] = (), candidates: int = 1024) -> Tensor:
    """`first` (B, T0) continued by `new_tokens` sampled tokens: (B, T0 + new_tokens) int64 on `first`'s device.

    The model is a Hugging Face causal LM (called with `past_key_values`, `use_cache`, `logits_to_keep=1`);
    logits are divided by `temperature`, the `suppressed` ids are never drawn, then `sample_nucleus`."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    vocab_suppressed = None
    tokens = [first]
    out = model(input_ids=first, use_cache=True, logits_to_keep=1)
    for step in range(new_tokens):
        logits = out.logits[:, -1, :].float() / temperature
        if suppressed:
            if vocab_suppressed is None:
                vocab_suppressed = torch.tensor([i for i in suppressed if 0 <= i < logits.shape[-1]],
                                                dtype=torch.long, device=logits.device)
            logits.index_fill_(-1, vocab_suppressed, float("-inf"))
        token = sample_nucleus(logits, top_p, candidates)
        tokens.append(token)
        if step + 1 < new_tokens:
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return torch.cat(tokens, dim=1)
