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
    embedding_relation_loss   in-batch pairwise-cosine matrices of student and teacher matched (MSE)

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
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qat.modules import QuantLinear


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
# kept (unmasked) tokens and compute their gradients together with the value, chunk by chunk
# (hand-derived softmax gradients, as Liger-Kernel's fused linear losses do): no float32
# (B*T, V) tensor is ever kept, and from hidden states + heads the (B, T, V) logits never exist.
# ---------------------------------------------------------------------------------------------

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
    _same_shape(student_logits, teacher_logits, "token_kd_loss")
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
        _same_shape(student_logits, teacher_logits, "head_kd_loss logits")
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


def embedding_relation_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Similarity-structure distillation: mean over the B (B - 1) ordered pairs i != j of
    (cos(s_i, s_j) - cos(t_i, t_j))^2, in float32 (teacher detached); 0 for a batch of one.

    The idea is relational KD (Park et al., CVPR 2019) and similarity-preserving KD (Tung & Mori,
    ICCV 2019): besides matching each sample's output, make the student's pairwise relations
    between the samples of a batch equal the teacher's. Here the relations are the cosines of
    L2-normalized sentence embeddings, the quantity nearest-neighbour retrieval ranks by: a
    per-sentence cosine loss spends as much effort on error directions that leave every pairwise
    cosine unchanged (a common rotation, say) as on those that change them, and only the latter can
    reorder near-tied neighbours; this term sees only them. A squared error over all pairs (rather
    than a KL of row softmaxes at a temperature) needs no temperature and weighs every pair alike;
    the diagonal (always 1 for both) is left out. On MiniLM with 2,358 training sentences it did not
    raise held-out NN agreement: the training pairs were fitted, the held-out ones not (see
    benchmarks/hf-models.md, issue 9 session 6).

    Example:
        >>> loss = embedding_cosine_loss(s, t) + 10.0 * embedding_relation_loss(s, t)  # s, t: (B, H)
    """
    _same_shape(student_emb, teacher_emb, "embedding_relation_loss")
    if student_emb.dim() != 2:
        raise ValueError(f"embedding_relation_loss: embeddings must be (B, H), got {tuple(student_emb.shape)}")
    batch = student_emb.shape[0]
    if batch < 2:
        return student_emb.new_zeros((), dtype=torch.float32)  # no pair, no relation to match
    student = F.normalize(student_emb.float(), dim=-1, eps=1e-8)  # (B, H)
    teacher = F.normalize(teacher_emb.detach().float(), dim=-1, eps=1e-8)
    difference = student @ student.T - teacher @ teacher.T  # (B, B)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=difference.device)
    return difference[off_diagonal].square().mean()
