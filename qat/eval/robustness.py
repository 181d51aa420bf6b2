"""Input perturbations for the robustness part of the report, seeded and repeatable.

    images (float inputs)   x + level * N(0, 1)                     (Gaussian noise)
    tokens (integer inputs) each token, with probability `level`, replaced by a uniformly
                            random token of the vocabulary           (typo-style substitution)
                            or by `drop_token` when one is given      (token dropout)

    images (4-D float)      photometric shifts of each image, clamped to the clean batch's value range:
                            brightness +-b (b added; inputs normalised as (pixel - 127) / 128: 0.25 is
                            32 grey levels), contrast c (x -> mean + c * (x - mean), per image)

Labels are never changed; a dict batch has its `input_ids` perturbed.

Example:
    >>> noisy = perturbation(0.1, seed=0)      # a transform for qat.eval.outputs.collect
    >>> out = collect(model, loader, transform=noisy)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

DEFAULT_IMAGE_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5)
DEFAULT_TOKEN_LEVELS = (0.0, 0.05, 0.1, 0.2)


def gaussian_noise(x: Tensor, level: float, generator: torch.Generator) -> Tensor:
    """`x` plus `level` times standard normal noise (same shape and dtype)."""
    return x + level * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def substitute_tokens(tokens: Tensor, level: float, vocab_size: int, generator: torch.Generator,
                      drop_token: Optional[int] = None) -> Tensor:
    """Each token replaced with probability `level`: by a random token in [0, vocab_size),
    or by `drop_token` (token dropout) when it is given."""
    hit = torch.rand(tokens.shape, generator=generator) < level
    if drop_token is not None:
        replacement = torch.full_like(tokens, drop_token)
    else:
        replacement = torch.randint(0, vocab_size, tokens.shape, generator=generator, dtype=tokens.dtype)
    return torch.where(hit, replacement, tokens)


def perturbation(level: float, seed: int = 0, vocab_size: Optional[int] = None,
                 drop_token: Optional[int] = None) -> Callable[[Any], Any]:
    """A transform of model inputs: Gaussian noise for float tensors, token substitution for
    integer tensors (needs `vocab_size`), applied to `input_ids` of a dict. Level 0: identity."""
    generator = torch.Generator().manual_seed(seed)

    def transform(inputs: Any) -> Any:
        if level == 0:
            return inputs
        if isinstance(inputs, dict):
            return {**inputs, "input_ids": transform(inputs["input_ids"])}
        if inputs.is_floating_point():
            return gaussian_noise(inputs, level, generator)
        if vocab_size is None:
            raise ValueError("token perturbation needs vocab_size")
        return substitute_tokens(inputs, level, vocab_size, generator, drop_token)

    return transform


PHOTOMETRIC_SHIFTS = (("brightness", 0.25), ("brightness", -0.25), ("contrast", 0.5), ("contrast", 1.5))


def photometric(kind: str, amount: float) -> Callable[[Tensor], Tensor]:
    """A brightness (`amount` added) or contrast (`amount` times the distance to each image's mean) shift of
    a batch of images (B, C, H, W), clamped to the batch's own [min, max] (a real camera saturates)."""
    if kind not in ("brightness", "contrast"):
        raise ValueError(f"photometric shift {kind!r}; allowed: 'brightness', 'contrast'")

    def transform(images: Tensor) -> Tensor:
        if kind == "brightness":
            shifted = images + amount
        else:
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            shifted = mean + amount * (images - mean)
        return shifted.clamp(images.min(), images.max())

    return transform


def is_image_batch(sample_input: Any) -> bool:
    """Whether model inputs like `sample_input` are images: a float tensor (B, C, H, W)."""
    return isinstance(sample_input, Tensor) and sample_input.is_floating_point() and sample_input.dim() == 4


def default_levels(sample_input: Any) -> tuple[float, ...]:
    """Noise levels for images (float input) or tokens (integer input)."""
    tensor = sample_input["input_ids"] if isinstance(sample_input, dict) else sample_input
    return DEFAULT_IMAGE_LEVELS if tensor.is_floating_point() else DEFAULT_TOKEN_LEVELS


def describe(sample_input: Any, drop_token: Optional[int] = None) -> str:
    """What `perturbation` does to inputs like `sample_input`, in words (for the report)."""
    tensor = sample_input["input_ids"] if isinstance(sample_input, dict) else sample_input
    if tensor.is_floating_point():
        return "Gaussian input noise (level: sigma)"
    if drop_token is not None:
        return f"token dropout (level: share of tokens replaced by token {drop_token})"
    return "typo-style token substitution (level: share of tokens replaced by random ones)"
