"""Per-token losses of language models, chunked: KD over (B, T, V) logits and the label loss.

    token_kd_loss     kd_logit_loss per token of (B, T, V) logits with a padding mask, chunked
    head_kd_loss      the same from hidden states + heads: the (B, T, V) logits never exist
    masked_cross_entropy / causal_lm_loss   label loss (next-token with the shift), masked, chunked

The losses run over chunks of `chunk_size` kept (unmasked) tokens and compute their gradients
together with the value, chunk by chunk (hand-derived softmax gradients, as Liger-Kernel's fused
linear losses do): no float32 (B*T, V) tensor is ever kept. Every loss is computed in float32.

Example:
    >>> loss = token_kd_loss(student_logits, teacher_logits, mask=attention_mask, temperature=2.0)
    >>> loss = causal_lm_loss(student_hidden, labels, attention_mask, head=model.lm_head)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.distill.logits import check_same_shape
from qat.modules import QuantLinear

DEFAULT_CHUNK_SIZE = 256  # tokens per chunk: 256 x 49152 fp32 = 48 MiB per chunk tensor (about 4 alive)
_ChunkFn = Callable[[Tensor, Tensor, Optional[float]], "tuple[Tensor, Tensor | None]"]


class _LossWithGrads(torch.autograd.Function):
    """`loss` whose gradients wrt `inputs` were computed with it; backward hands them back (times the
    incoming gradient). Saves no activations: the stored gradients are what backward would allocate."""

    @staticmethod
    def forward(ctx, loss: Tensor, grads: tuple, *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("a chunked loss supports one backward pass (its gradients were computed in forward)")
        return (None, None, *(None if g is None else g.mul_(grad_output) for g in grads))


def _kept_rows(mask: Tensor | None, leading_shape: torch.Size, device: torch.device) -> Tensor:
    """Flat indices (n,) of the tokens a loss averages over: nonzero `mask` entries (all when None)."""
    if mask is None:
        return torch.arange(math.prod(leading_shape), device=device)
    if mask.shape != leading_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != the tokens' shape {tuple(leading_shape)}")
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


def _check_chunking(temperature: float, chunk_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")


def _kl_chunk(student: Tensor, teacher: Tensor, temperature: float, grad_scale: float | None):
    """T^2 * sum over rows of KL(p_t || p_s), p = softmax(logits / T), for (c, V) chunks, in float32;
    with `grad_scale` also grad_scale * its gradient wrt the student logits, T * (p_s - p_t)."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)  # (c, V)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    kl_sum = p_teacher.reshape(-1) @ log_p_teacher.sub_(log_p_student).reshape(-1)  # a dot: no (c, V) product
    if grad_scale is None:
        return kl_sum * temperature**2, None
    return kl_sum * temperature**2, log_p_student.exp_().sub_(p_teacher).mul_(temperature * grad_scale)


def _ce_chunk(logits: Tensor, targets: Tensor, grad_scale: float | None):
    """Sum over rows of -log softmax(logits)[target], in float32; with `grad_scale` also grad_scale * its
    gradient wrt the logits, softmax(logits) - onehot(target)."""
    if int(targets.max()) >= logits.shape[-1]:
        raise ValueError(f"target id {int(targets.max())} >= the {logits.shape[-1]} classes of the logits")
    log_p = F.log_softmax(logits.float(), dim=-1)  # (c, V)
    loss_sum = -log_p.gather(1, targets.unsqueeze(1)).sum()
    if grad_scale is None:
        return loss_sum, None
    grad = log_p.exp_().scatter_add_(1, targets.unsqueeze(1), log_p.new_full((len(targets), 1), -1.0))
    return loss_sum, grad.mul_(grad_scale)


def _chunked_from_logits(logits: Tensor, rows: Tensor, chunk_size: int, chunk_fn: _ChunkFn) -> Tensor:
    """Mean over `rows` of chunk_fn's per-row losses on (N, V) logits, with the gradient made alongside."""
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    count = max(rows.numel(), 1)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    grad = torch.zeros_like(logits) if need_grad else None  # (N, V), what backward would allocate
    with torch.no_grad():
        for idx in rows.split(chunk_size):
            loss_sum, chunk_grad = chunk_fn(logits.index_select(0, idx), idx, 1.0 / count if need_grad else None)
            total += loss_sum
            if grad is not None:
                grad.index_copy_(0, idx, chunk_grad.to(grad.dtype))
    return _LossWithGrads.apply(total / count, (grad,), logits) if need_grad else total / count


def _head_projection(head: nn.Module) -> tuple[Tensor | None, Callable[[Tensor, Tensor | None], Tensor]]:
    """(weight, project) with project(x, weight) == head(x). For an nn.Linear or QuantLinear head the
    weight is its effective (fake-quantized) weight, computed once per loss call instead of once per
    chunk; any other module gives (None, head(x))."""
    if type(head).forward not in (nn.Linear.forward, QuantLinear.forward):
        return None, lambda x, weight: head(x)
    if isinstance(head, QuantLinear):
        return head.quantized_weight(), lambda x, weight: F.linear(head.quantized_input(x), weight, head.bias)
    return head.weight, lambda x, weight: F.linear(x, weight, head.bias)


def _chunked_from_hidden(hidden: Tensor, head: nn.Module, rows: Tensor, chunk_size: int,
                         chunk_fn: _ChunkFn) -> Tensor:
    """Mean over `rows` of chunk_fn's per-row losses on head(hidden), projected chunk by chunk; the
    gradients wrt the hidden states and the head's parameters are made alongside."""
    params = [p for p in head.parameters() if p.requires_grad]
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(params))
    count = max(rows.numel(), 1)
    with torch.enable_grad() if need_grad else torch.no_grad():
        weight, project = _head_projection(head)  # (V, H) with its graph to the weight and its quantizer
    weight_leaf = None if weight is None else weight.detach().requires_grad_(need_grad and weight.requires_grad)
    # what each chunk's backward reaches, and where it accumulates: hidden rows, the hoisted weight, parameters
    grad_hidden = torch.zeros_like(hidden) if need_grad and hidden.requires_grad else None
    grad_params = [torch.zeros_like(p) for p in params] if need_grad else []
    weight_is_param = [i for i, p in enumerate(params) if p is weight]  # a float Linear: no separate buffer
    grad_weight = None if weight_leaf is None or not weight_leaf.requires_grad else \
        grad_params[weight_is_param[0]] if weight_is_param else torch.zeros_like(weight_leaf)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for idx in rows.split(chunk_size):
        with torch.enable_grad() if need_grad else torch.no_grad():
            chunk = hidden.detach().index_select(0, idx).requires_grad_(grad_hidden is not None)
            logits = project(chunk, weight_leaf)  # (c, V)
        loss_sum, logits_grad = chunk_fn(logits.detach(), idx, 1.0 / count if need_grad else None)
        total += loss_sum
        if not need_grad:
            continue
        targets = [(chunk, grad_hidden), (weight_leaf, grad_weight), *zip(params, grad_params, strict=True)]
        targets = [(source, into) for source, into in targets if into is not None]
        parts = torch.autograd.grad(logits, [s for s, _ in targets], logits_grad.to(logits.dtype), allow_unused=True)
        for (source, into), part in zip(targets, parts, strict=True):
            if part is None:
                continue
            if source is chunk:
                into.index_add_(0, idx, part.to(into.dtype))  # the chunk's rows of the hidden states
            else:
                into.add_(part)  # summed over chunks
    if not need_grad:
        return total / count
    if grad_weight is not None and not weight_is_param:  # one backward through the fake-quantization
        parts = torch.autograd.grad(weight, params, grad_weight, allow_unused=True)
        for into, part in zip(grad_params, parts, strict=True):
            if part is not None:
                into.add_(part)
    return _LossWithGrads.apply(total / count, (grad_hidden, *grad_params), hidden, *params)


def _flat_rows(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1, tensor.shape[-1])  # (N, C): a view for contiguous inputs


def token_kd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                  temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)) per token, averaged over the tokens where `mask` is nonzero.

    Logits (B, T, V) (or (N, V)), any float dtype (bf16 included: each chunk is computed in
    float32); mask (B, T) or None (all tokens). Runs over chunks of `chunk_size` tokens and
    makes the gradient d loss / d s = T * (p_s - p_t) / n with the value, so besides the
    logits and their gradient only one chunk's float32 tensors are alive. The teacher gets no
    gradient; no kept token gives 0. One backward pass per call.
    """
    check_same_shape(student_logits, teacher_logits, "token_kd_loss")
    _check_chunking(temperature, chunk_size)
    rows = _kept_rows(mask, student_logits.shape[:-1], student_logits.device)
    teacher = _flat_rows(teacher_logits.detach())

    def chunk_fn(student: Tensor, idx: Tensor, grad_scale: float | None):
        return _kl_chunk(student, teacher.index_select(0, idx), temperature, grad_scale)

    return _chunked_from_logits(_flat_rows(student_logits), rows, chunk_size, chunk_fn)


def head_kd_loss(student_hidden: Tensor, teacher_hidden: Tensor, student_head: nn.Module, teacher_head: nn.Module,
                 mask: Tensor | None = None, temperature: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """`token_kd_loss` of `student_head(student_hidden)` vs `teacher_head(teacher_hidden)`, never forming (B, T, V).

    Hidden states (B, T, H) and (B, T, Ht); each chunk of `chunk_size` kept tokens is projected
    by both heads, reduced, and its gradient pushed through the student head at once, so peak
    memory holds one chunk's logits whatever B * T. Gradients reach `student_hidden` and the
    student head's trainable parameters (a QuantLinear's weight and quantizer scales); the
    teacher side gets none. A Linear / QuantLinear head's (fake-quantized) weight is computed once
    per call, not per chunk; other head modules are called per chunk. An input (activation)
    quantizer in the head sees each chunk as one call, so LSQ's gradient factor 1/sqrt(N*Qp)
    counts the chunk's elements: its scale's gradient differs from an unchunked call's.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"head_kd_loss: student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in their token dims")
    _check_chunking(temperature, chunk_size)
    rows = _kept_rows(mask, student_hidden.shape[:-1], student_hidden.device)
    teacher = _flat_rows(teacher_hidden.detach())

    def chunk_fn(student_logits: Tensor, idx: Tensor, grad_scale: float | None):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher.index_select(0, idx))  # (c, V)
        check_same_shape(student_logits, teacher_logits, "head_kd_loss logits")
        return _kl_chunk(student_logits, teacher_logits, temperature, grad_scale)

    return _chunked_from_hidden(_flat_rows(student_hidden), student_head, rows, chunk_size, chunk_fn)


def masked_cross_entropy(logits_or_hidden: Tensor, targets: Tensor, mask: Tensor | None = None,
                         head: nn.Module | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         ignore_index: int = -100) -> Tensor:
    """Cross-entropy of each token's logits against `targets`, averaged over the kept tokens (no shift).

    A token is kept where `mask` (same shape as `targets`) is nonzero and its target is not
    `ignore_index`. Without `head` the first argument is logits (..., V); with `head` it is
    hidden states (..., H) projected chunk by chunk (no (B, T, V) tensor, as in `head_kd_loss`).
    Float32 over chunks of `chunk_size` tokens. No kept token gives 0.
    """
    if logits_or_hidden.shape[:-1] != targets.shape:
        raise ValueError(f"masked_cross_entropy: inputs {tuple(logits_or_hidden.shape)} do not match "
                         f"targets {tuple(targets.shape)} (expected (..., V) against (...))")
    _check_chunking(1.0, chunk_size)
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    keep = targets != ignore_index if mask is None else (mask != 0) & (targets != ignore_index)
    rows = _kept_rows(keep, targets.shape, logits_or_hidden.device)
    flat_targets = targets.reshape(-1).long()
    if rows.numel() and int(flat_targets[rows].min()) < 0:
        raise ValueError(f"target id {int(flat_targets[rows].min())} is negative (only ignore_index={ignore_index} "
                         "may be)")

    def chunk_fn(logits: Tensor, idx: Tensor, grad_scale: float | None):
        return _ce_chunk(logits, flat_targets.index_select(0, idx), grad_scale)

    if head is None:
        return _chunked_from_logits(_flat_rows(logits_or_hidden), rows, chunk_size, chunk_fn)
    return _chunked_from_hidden(_flat_rows(logits_or_hidden), head, rows, chunk_size, chunk_fn)


def causal_lm_loss(logits_or_hidden: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                   head: nn.Module | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy: position t predicts labels[:, t + 1] (Hugging Face's shift), in float32.

    `logits_or_hidden` (B, T, V), or (B, T, H) hidden states with `head`; labels (B, T) with
    `ignore_index` for tokens not to learn; attention_mask (B, T), 0 = padding. A prediction
    counts when its target token is neither padding nor ignored. Averaged over those tokens;
    the logits are never copied (the shift is done on indices).
    """
    if labels.dim() != 2 or logits_or_hidden.shape[:2] != labels.shape:
        raise ValueError(f"causal_lm_loss: inputs {tuple(logits_or_hidden.shape)} and labels {tuple(labels.shape)} "
                         "must be (B, T, V or H) and (B, T)")
    targets = torch.full_like(labels, ignore_index)  # (B, T): targets[:, t] = labels[:, t + 1]
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != labels {tuple(labels.shape)}")
        targets[:, :-1] = targets[:, :-1].masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    return masked_cross_entropy(logits_or_hidden, targets, head=head, chunk_size=chunk_size,
                                ignore_index=ignore_index)
