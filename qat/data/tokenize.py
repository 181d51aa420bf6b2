"""Tokenizer glue shared by the text data modules, and the checks that catch a bad set-up early.

A tokenizer is anything with `encode(text) -> ids` (a Hugging Face tokenizer, a `tokenizers.Tokenizer`,
or a small stub) or, failing that, `__call__(text) -> {"input_ids": ids}`. Hugging Face extras
(`add_special_tokens`, `eos_token_id`, `pad_token_id`, `model_max_length`) are used when present.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

# Hugging Face sets model_max_length to int(1e30) when a tokenizer does not know its model's limit.
_UNKNOWN_MAX_LENGTH = 10**9


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (no BOS/CLS added), as a list of ints."""
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
        except TypeError:  # a tokenizer without Hugging Face's keyword arguments
            ids = tokenizer.encode(text)
    elif callable(tokenizer):
        ids = tokenizer(text)["input_ids"]
    else:
        raise TypeError(f"tokenizer of type {type(tokenizer).__name__} has neither encode() nor __call__()")
    ids = getattr(ids, "ids", ids)  # tokenizers.Encoding -> its ids
    return [int(i) for i in ids]


def encode_documents(tokenizer: Any, documents: Sequence[str]) -> list[list[int]]:
    """Token ids of each document (see `encode_text`)."""
    return [encode_text(tokenizer, document) for document in documents]


def tokenizer_eos_id(tokenizer: Any) -> Optional[int]:
    """The tokenizer's end-of-sequence id, or None when it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def max_sequence_length(tokenizer: Any, max_positions: Optional[int] = None) -> Optional[int]:
    """The longest sequence the model takes: `max_positions` if given, else the tokenizer's known limit."""
    if max_positions is not None:
        return int(max_positions)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _UNKNOWN_MAX_LENGTH:
        return limit
    return None


def check_length(length: int, what: str, tokenizer: Any, max_positions: Optional[int]) -> None:
    """ValueError when `length` (named `what`) is < 2 or above the model's / tokenizer's maximum."""
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"{what}={length!r} must be an integer >= 2")
    limit = max_sequence_length(tokenizer, max_positions)
    if limit is not None and length > limit:
        source = "max_positions" if max_positions is not None else "the tokenizer's model_max_length"
        raise ValueError(f"{what}={length} is above the model's maximum sequence length {limit} ({source})")


def check_split_settings(val_fraction: float, **counts: Optional[int]) -> None:
    """ValueError unless 0 < val_fraction < 1 and every count given (None = unset) is a positive integer."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be between 0 and 1 (exclusive)")
    for name, value in counts.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer")


def check_ids_in_vocab(ids: torch.Tensor, vocab_size: Optional[int]) -> None:
    """ValueError when a token id is outside [0, vocab_size): the tokenizer does not match the model."""
    if vocab_size is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(f"the tokenizer produced token id {bad}, outside the model's vocabulary of {vocab_size} "
                         "entries: the tokenizer does not match the model")
