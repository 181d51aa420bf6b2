"""Knowledge-distillation losses: logits (temperature-scaled KL), intermediate features, LMs, encoders.

    kd_logit_loss     T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over rows
                      (Hinton et al. 2015: the T^2 keeps gradient magnitudes independent of T)
    feature_mse       mean squared difference of two feature maps
    feature_cosine    1 - cosine similarity of each sample's flattened features, averaged
    FeatureTaps       forward hooks keeping the latest output of named layers, so features
                      of a student and a teacher can be compared by a student->teacher mapping
    token_kd_loss     kd_logit_loss per token of (B, T, V) logits with a padding mask, chunked
    head_kd_loss      the same from hidden states + heads: the (B, T, V) logits never exist
    masked_cross_entropy / causal_lm_loss   label loss (next-token with the shift), masked, chunked
    mean_pool, embedding_cosine_loss, embedding_mse_loss   sentence-encoder distillation

Every loss is computed in float32 whatever the input dtype (a bf16 teacher included).

Example:
    >>> taps_s, taps_t = FeatureTaps(student, ["features.3"]), FeatureTaps(teacher, ["features.3"])
    >>> s_logits, t_logits = student(x), teacher(x)
    >>> loss = kd_logit_loss(s_logits, t_logits, temperature=2.0)
    >>> loss = loss + feature_mse(taps_s.outputs["features.3"], taps_t.outputs["features.3"])
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle


def _same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")


def kd_logit_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(p_teacher || p_student) with p = softmax(logits / T) over the last dim.

    Logits may be (B, C) or (B, T, C); the KL is summed over classes and averaged over
    every row (all leading dims). The teacher's logits get no gradient.
    """
    _same_shape(student_logits, teacher_logits, "kd_logit_loss")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)  # (R, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def feature_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over all elements of (student - teacher)^2 (teacher detached)."""
    _same_shape(student, teacher, "feature_mse")
    return F.mse_loss(student.float(), teacher.detach().float())


def feature_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over samples of 1 - cos(student_i, teacher_i), each sample's features flattened."""
    _same_shape(student, teacher, "feature_cosine")
    s, t = student.float().flatten(1), teacher.detach().float().flatten(1)  # (B, F)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


FEATURE_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": feature_mse, "cosine": feature_cosine}


def _first_tensor(output: Any) -> Tensor:
    """A layer's output, or the first tensor of a tuple / list / dict output (e.g. Hugging Face blocks)."""
    if isinstance(output, Tensor):
        return output
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"cannot take a feature from a layer output of type {type(output).__name__}")


class FeatureTaps:
    """Forward hooks on named layers of `model`; `outputs[name]` is the latest output of each.

    Unknown names raise ValueError listing close matches. `remove()` takes the hooks off,
    `attach()` puts them back; `clear()` drops the stored outputs (and their graphs).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.model, self.names, self.role = model, list(names), role
        known = dict(model.named_modules())
        for name in self.names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise ValueError(f"{role} has no layer named {name!r} for feature distillation{hint}")
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self.attach()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[name] = _first_tensor(output)

        return keep

    def attach(self) -> None:
        """Register the hooks (no-op if they are on)."""
        if not self._handles:
            self._handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def remove(self) -> None:
        """Take the hooks off and forget the stored outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.outputs = {}


def feature_loss(student_taps: FeatureTaps, teacher_taps: FeatureTaps, mapping: dict[str, str],
                 kind: str = "mse") -> Tensor:
    """Sum over `mapping` {student layer: teacher layer} of the `kind` loss between their latest outputs."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature loss {kind!r} is not valid; allowed: {', '.join(FEATURE_LOSSES)}")
    terms = []
    for student_name, teacher_name in mapping.items():
        missing = [n for n, taps in ((student_name, student_taps), (teacher_name, teacher_taps))
                   if n not in taps.outputs]
        if missing:
            raise RuntimeError(f"no output recorded for layer(s) {missing}: they did not run in the last forward")
        student, teacher = student_taps.outputs[student_name], teacher_taps.outputs[teacher_name]
        try:
            terms.append(FEATURE_LOSSES[kind](student, teacher))
        except ValueError as err:
            raise ValueError(f"features {student_name!r} (student) -> {teacher_name!r} (teacher): {err}") from None
    return torch.stack(terms).sum()


# ---------------------------------------------------------------------------------------------
# Language models and sentence encoders. The per-token losses run over chunks of `chunk_size`
# unmasked tokens and keep no float32 (B*T, V) tensor for backward: from logits, a custom
# autograd Function recomputes each chunk's softmax in backward; from hidden states + heads,
# each chunk runs under torch.utils.checkpoint, so the (B, T, V) logits never exist at all.
# ---------------------------------------------------------------------------------------------

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 49152 fp32 = 192 MiB per live chunk tensor


def _kept_rows(mask: Tensor | None, leading_shape: torch.Size, device: torch.device) -> Tensor:
    """Flat indices (n,) of the tokens a loss averages over: nonzero `mask` entries (all when None)."""
    rows = math.prod(leading_shape)
    if mask is None:
        return torch.arange(rows, device=device)
    if mask.shape != leading_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != the tokens' shape {tuple(leading_shape)}")
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


def _check_chunking(temperature: float, chunk_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")


def _kl_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Sum over rows of KL(softmax(t / T) || softmax(s / T)), in float32. (n, V) inputs."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()


class _ChunkedTokenKL(torch.autograd.Function):
    """T^2 / n * sum over kept rows of KL(p_t || p_s). Backward (hand-derived, recomputed per chunk):
    d loss / d s_r = T / n * (softmax(s_r / T) - softmax(t_r / T)) for kept rows r, 0 elsewhere."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor, temperature: float, chunk_size: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for idx in rows.split(chunk_size):
            total += _kl_sum(student.index_select(0, idx), teacher.index_select(0, idx), temperature)
        ctx.save_for_backward(student, teacher, rows)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return total * temperature**2 / max(rows.numel(), 1)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        student, teacher, rows = ctx.saved_tensors
        temperature = ctx.temperature
        scale = grad_output.float() * temperature / max(rows.numel(), 1)
        grad = torch.zeros_like(student)  # (N, V)
        for idx in rows.split(ctx.chunk_size):
            p_student = F.softmax(student.index_select(0, idx).float() / temperature, dim=-1)
            p_teacher = F.softmax(teacher.index_select(0, idx).float() / temperature, dim=-1)
            grad.index_copy_(0, idx, ((p_student - p_teacher) * scale).to(grad.dtype))
        return grad, None, None, None, None


def token_kd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
                  temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)) per token, averaged over the tokens where `mask` is nonzero.

    Logits (B, T, V) (or (N, V)), any float dtype (bf16 included: each chunk is computed in
    float32); mask (B, T) or None (all tokens). Work runs over chunks of `chunk_size` tokens;
    backward recomputes each chunk, so besides the logits and their gradient only one chunk's
    float32 tensors are alive. The teacher gets no gradient; no kept token gives 0.
    """
    _same_shape(student_logits, teacher_logits, "token_kd_loss")
    _check_chunking(temperature, chunk_size)
    vocab = student_logits.shape[-1]
    rows = _kept_rows(mask, student_logits.shape[:-1], student_logits.device)
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)  # (N, V) views
    return _ChunkedTokenKL.apply(student, teacher, rows, float(temperature), chunk_size)


def _head_kl_chunk(student_hidden: Tensor, teacher_hidden: Tensor, student_head: nn.Module,
                   teacher_head: nn.Module, temperature: float) -> Tensor:
    student_logits = student_head(student_hidden)  # (n, V)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)  # (n, V)
    _same_shape(student_logits, teacher_logits, "head_kd_loss logits")
    return _kl_sum(student_logits, teacher_logits, temperature)


def _flat_rows(hidden: Tensor) -> Tensor:
    return hidden.reshape(-1, hidden.shape[-1])  # (N, H)


def head_kd_loss(student_hidden: Tensor, teacher_hidden: Tensor, student_head: nn.Module, teacher_head: nn.Module,
                 mask: Tensor | None = None, temperature: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """`token_kd_loss` of `student_head(student_hidden)` vs `teacher_head(teacher_hidden)`, never forming (B, T, V).

    Hidden states (B, T, H) and (B, T, Ht); each chunk of `chunk_size` kept tokens is projected
    by the heads and reduced under activation checkpointing, so peak memory holds one chunk's
    logits whatever B * T. Gradients reach `student_hidden` and the student head's parameters
    (a QuantLinear's weight and quantizer scales); the teacher side gets none. The student head
    runs twice per chunk (forward and the recomputation in backward).
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"head_kd_loss: student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in their token dims")
    _check_chunking(temperature, chunk_size)
    rows = _kept_rows(mask, student_hidden.shape[:-1], student_hidden.device)
    student, teacher = _flat_rows(student_hidden), _flat_rows(teacher_hidden.detach())
    total = student[:0].float().sum()  # 0, connected to the graph even when no token is kept
    for idx in rows.split(chunk_size):
        total = total + checkpoint(_head_kl_chunk, student.index_select(0, idx), teacher.index_select(0, idx),
                                   student_head, teacher_head, float(temperature), use_reentrant=False)
    return total * temperature**2 / max(rows.numel(), 1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """1 / n * sum over kept rows of (logsumexp(s_r) - s_r[y_r]). Backward (hand-derived, per chunk):
    d loss / d s_r = (softmax(s_r) - onehot(y_r)) / n for kept rows r, 0 elsewhere."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, rows: Tensor, chunk_size: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for idx in rows.split(chunk_size):
            chunk = logits.index_select(0, idx).float()  # (n, V)
            target = targets.index_select(0, idx).unsqueeze(1)  # (n, 1)
            total += (torch.logsumexp(chunk, dim=-1) - chunk.gather(1, target).squeeze(1)).sum()
        ctx.save_for_backward(logits, targets, rows)
        ctx.chunk_size = chunk_size
        return total / max(rows.numel(), 1)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        logits, targets, rows = ctx.saved_tensors
        scale = grad_output.float() / max(rows.numel(), 1)
        grad = torch.zeros_like(logits)  # (N, V)
        for idx in rows.split(ctx.chunk_size):
            chunk_grad = F.softmax(logits.index_select(0, idx).float(), dim=-1)
            minus_one = chunk_grad.new_full((len(idx), 1), -1.0)
            chunk_grad.scatter_add_(1, targets.index_select(0, idx).unsqueeze(1), minus_one)  # - onehot(y)
            grad.index_copy_(0, idx, (chunk_grad * scale).to(grad.dtype))
        return grad, None, None, None


def _head_ce_chunk(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    if int(targets.max()) >= logits.shape[-1]:
        raise ValueError(f"target id {int(targets.max())} >= the head's {logits.shape[-1]} classes")
    return F.cross_entropy(logits, targets, reduction="sum")


def masked_cross_entropy(logits_or_hidden: Tensor, targets: Tensor, mask: Tensor | None = None,
                         head: nn.Module | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         ignore_index: int = -100) -> Tensor:
    """Cross-entropy of each token's logits against `targets`, averaged over the kept tokens (no shift).

    A token is kept where `mask` (same shape as `targets`) is nonzero and its target is not
    `ignore_index`. Without `head` the first argument is logits (..., V); with `head` it is
    hidden states (..., H) projected chunk by chunk under checkpointing (no (B, T, V) tensor).
    Computed in float32 over chunks of `chunk_size` tokens. No kept token gives 0.
    """
    if logits_or_hidden.shape[:-1] != targets.shape:
        raise ValueError(f"masked_cross_entropy: inputs {tuple(logits_or_hidden.shape)} do not match "
                         f"targets {tuple(targets.shape)} (expected (..., V) against (...))")
    _check_chunking(1.0, chunk_size)
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    keep = targets != ignore_index if mask is None else (mask != 0) & (targets != ignore_index)
    rows = _kept_rows(keep, targets.shape, logits_or_hidden.device)
    flat_inputs, flat_targets = _flat_rows(logits_or_hidden), targets.reshape(-1).long()
    kept_targets = flat_targets[rows]
    if kept_targets.numel() and int(kept_targets.min()) < 0:
        raise ValueError(f"target id {int(kept_targets.min())} is negative (only ignore_index={ignore_index} may be)")
    if head is None:
        if kept_targets.numel() and int(kept_targets.max()) >= flat_inputs.shape[-1]:
            raise ValueError(f"target id {int(kept_targets.max())} >= the logits' {flat_inputs.shape[-1]} classes")
        return _ChunkedCrossEntropy.apply(flat_inputs, flat_targets, rows, chunk_size)
    total = flat_inputs[:0].float().sum()  # 0, connected to the graph even when no token is kept
    for idx in rows.split(chunk_size):
        total = total + checkpoint(_head_ce_chunk, flat_inputs.index_select(0, idx), flat_targets.index_select(0, idx),
                                   head, use_reentrant=False)
    return total / max(rows.numel(), 1)


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


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence embeddings (B, H), float32: the mean of the hidden states (B, T, H) over unmasked tokens.

    Sentence-transformers' mean pooling (the divisor is clamped to 1e-9, so an all-padding row gives 0).
    """
    if attention_mask.shape != hidden.shape[:-1]:
        raise ValueError(f"mean_pool: attention_mask {tuple(attention_mask.shape)} does not match hidden states "
                         f"{tuple(hidden.shape)} (expected (B, T) and (B, T, H))")
    weights = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def embedding_cosine_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Mean over rows of 1 - cos(student, teacher), cosine along the last dim (teacher detached)."""
    _same_shape(student_emb, teacher_emb, "embedding_cosine_loss")
    cosine = F.cosine_similarity(student_emb.float(), teacher_emb.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - cosine).mean()


def embedding_mse_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Mean over all elements of (student - teacher)^2 (teacher detached)."""
    _same_shape(student_emb, teacher_emb, "embedding_mse_loss")
    return F.mse_loss(student_emb.float(), teacher_emb.detach().float())
