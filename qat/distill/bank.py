"""Neighbourhood distillation of sentence embeddings against a bank of teacher embeddings.

    teacher_bank          the frozen teacher's unit embeddings of every training sentence, once: (N, H)
    bank_relation_loss    each student embedding's cosines to the bank matched to its teacher's:
                          'kl'  KL(softmax(cos(t_i, bank) / tau) || softmax(cos(s_i, bank) / tau)), or
                          'mse' mean of (cos(s_i, bank) - cos(t_i, bank))^2,
                          over the whole bank or the teacher's `top_k` nearest entries, sentence i left out

Top-1 nearest-neighbour agreement is a ranking over many sentences, while a batch of 32 random sentences
almost never holds a sentence's near neighbours, so an in-batch relational loss
(`qat.distill.embedding.embedding_relation_loss`) never sees the pairs that flip. Against a bank of the whole
training set every sentence meets its near neighbours at every step. The 'kl' form is similarity-based
distillation (CompRess, Abbasi Koohpayegani et al. NeurIPS 2020; SEED, Fang et al. ICLR 2021) with the
teacher's embeddings as the only memory: the student's row uses the teacher's bank, so no student bank
has to be kept fresh. A small temperature (0.02-0.05) makes the nearest entries dominate.

The bank holds training sentences only; sentence i's own entry is found by its teacher cosine
(>= `SELF_COSINE`: the same input; a duplicate after truncation is the same point and is left out too).

Example:
    >>> bank = teacher_bank(lambda batch: task.forward(teacher, batch), train_batches)  # (N, H)
    >>> loss = embedding_cosine_loss(s, t) + 1.0 * bank_relation_loss(s, t, bank, "kl", temperature=0.05)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BANK_LOSSES = ("kl", "mse")
SELF_COSINE = 1.0 - 1e-4  # a teacher cosine this close to 1 is the sentence itself (float rounding of padding)


@torch.no_grad()
def teacher_bank(embed: Callable[[Any], Tensor], batches: Iterable[Any]) -> Tensor:
    """(N, H) float32 unit rows: `embed(batch)` ((B, H) each) for every batch, concatenated in order."""
    rows = [F.normalize(embed(batch).float(), dim=-1, eps=1e-8) for batch in batches]
    if not rows:
        raise ValueError("teacher_bank: no batches to embed (the training set is empty)")
    return torch.cat(rows)


def _check(student_emb: Tensor, teacher_emb: Tensor, bank: Tensor, kind: str, temperature: float,
           top_k: Optional[int]) -> None:
    if student_emb.shape != teacher_emb.shape or student_emb.dim() != 2:
        raise ValueError(f"bank_relation_loss: student {tuple(student_emb.shape)} and teacher "
                         f"{tuple(teacher_emb.shape)} embeddings must both be (B, H)")
    if bank.dim() != 2 or bank.shape[1] != student_emb.shape[1]:
        raise ValueError(f"bank_relation_loss: bank {tuple(bank.shape)} must be (N, {student_emb.shape[1]})")
    if kind not in BANK_LOSSES:
        raise ValueError(f"bank loss {kind!r} is not valid; allowed: {', '.join(BANK_LOSSES)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be >= 1 (or None for the whole bank)")


def bank_cosines(student_emb: Tensor, teacher_emb: Tensor, bank: Tensor,
                 top_k: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(student cosines, teacher cosines, kept) to the bank, each (B, N): `kept` leaves out each sentence's
    own entry and, with `top_k`, keeps only the teacher's k nearest other entries. Float32; teacher detached."""
    student = F.normalize(student_emb.float(), dim=-1, eps=1e-8)  # (B, H)
    teacher = F.normalize(teacher_emb.detach().float(), dim=-1, eps=1e-8)
    bank = F.normalize(bank.detach().float(), dim=-1, eps=1e-8)  # (N, H)
    student_cos, teacher_cos = student @ bank.T, teacher @ bank.T  # (B, N)
    kept = teacher_cos < SELF_COSINE
    if top_k is not None and top_k < bank.shape[0]:
        nearest = teacher_cos.masked_fill(~kept, float("-inf")).topk(top_k, dim=-1).indices  # (B, k)
        kept &= torch.zeros_like(kept).scatter_(1, nearest, True)
    return student_cos, teacher_cos, kept


def bank_relation_loss(student_emb: Tensor, teacher_emb: Tensor, bank: Tensor, kind: str = "kl",
                       temperature: float = 0.05, top_k: Optional[int] = None) -> Tensor:
    """Neighbourhood distillation of (B, H) embeddings against an (N, H) teacher bank, in float32.

    'kl': mean over rows of KL(p_t || p_s), p = softmax over the kept bank entries of cosine / temperature
    (gradient wrt the student cosines (p_s - p_t) / temperature, per row). 'mse': mean over all kept
    (row, entry) pairs of (cos(s_i, b_j) - cos(t_i, b_j))^2. Kept entries: see `bank_cosines`; a row
    with none adds 0 (but counts in the 'kl' mean). Only the student gets gradients.
    """
    _check(student_emb, teacher_emb, bank, kind, temperature, top_k)
    student_cos, teacher_cos, kept = bank_cosines(student_emb, teacher_emb, bank, top_k)
    if kind == "mse":
        return (student_cos - teacher_cos).square().mul(kept).sum() / kept.sum().clamp(min=1)
    # A finite fill, not -inf: a left-out entry gets p = 0 on both sides and a 0 term, a row with none kept
    # is uniform on both sides (KL 0), and no inf - inf turns into NaN in the gradient.
    fill = torch.finfo(torch.float32).min
    log_p_student = F.log_softmax((student_cos / temperature).masked_fill(~kept, fill), dim=-1)  # (B, N)
    log_p_teacher = F.log_softmax((teacher_cos / temperature).masked_fill(~kept, fill), dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
