"""Language-model / encoder distillation losses against direct (unchunked) torch computations.

References are plain autograd over the full float32 tensors. The chunked losses sum the same
float32 terms in a different order (per chunk, then across chunks), so values and gradients
agree to float32 rounding, not bit for bit: RTOL / ATOL below are ~100 float32 ulps of the
magnitudes involved (loss ~1, gradient entries ~1e-3). Masking is exact: masked tokens' inputs
never enter the computation, so their gradients are exactly 0 and changing them changes nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.config import LayerConfig, QuantizerConfig, default_activation_config
from qat.distill import (
    causal_lm_loss,
    embedding_cosine_loss,
    embedding_mse_loss,
    head_kd_loss,
    kd_logit_loss,
    masked_cross_entropy,
    mean_pool,
    token_kd_loss,
)
from qat.modules import QuantLinear

RTOL, ATOL = 1e-5, 1e-7
B, T, V, H = 2, 5, 11, 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference_token_kd(student, teacher, mask, temperature):
    """T^2 * masked mean over tokens of KL(p_t || p_s), directly on the full (B, T, V) float32 tensors."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    weights = torch.ones_like(kl) if mask is None else mask.float()
    return temperature**2 * (kl * weights).sum() / weights.sum()


def logits_pair(requires_grad=True):
    student = (3 * torch.randn(B, T, V)).requires_grad_(requires_grad)
    return student, 3 * torch.randn(B, T, V)


MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])


def grad_of(loss, tensor):
    (grad,) = torch.autograd.grad(loss, tensor)
    return grad


@pytest.mark.parametrize("mask", [None, MASK])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_kd_value_and_hand_derived_gradient_match_autograd(mask, temperature):
    student, teacher = logits_pair()
    loss = token_kd_loss(student, teacher, mask, temperature=temperature, chunk_size=3)
    expected = reference_token_kd(student, teacher, mask, temperature)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_of(loss, student), grad_of(expected, student), rtol=RTOL, atol=ATOL)


def test_token_kd_without_mask_equals_the_existing_row_loss():
    student, teacher = logits_pair(requires_grad=False)
    torch.testing.assert_close(token_kd_loss(student, teacher, temperature=2.0),
                               kd_logit_loss(student, teacher, temperature=2.0), rtol=RTOL, atol=ATOL)


def test_token_kd_masked_tokens_change_nothing_and_get_zero_gradient():
    student, teacher = logits_pair()
    loss = token_kd_loss(student, teacher, MASK, temperature=2.0)
    grad = grad_of(loss, student)
    assert torch.equal(grad[MASK == 0], torch.zeros_like(grad[MASK == 0]))
    altered_student = student.detach().clone().masked_fill((MASK == 0).unsqueeze(-1), 1e4).requires_grad_()
    altered_teacher = teacher.masked_fill((MASK == 0).unsqueeze(-1), -1e4)
    altered = token_kd_loss(altered_student, altered_teacher, MASK, temperature=2.0)
    assert torch.equal(altered, loss)
    assert torch.equal(grad_of(altered, altered_student), grad)


@pytest.mark.parametrize("chunk_size", [1, 7, B * T, 4096])
def test_token_kd_chunking_gives_the_same_value_and_gradient(chunk_size):
    student, teacher = logits_pair()
    whole = token_kd_loss(student, teacher, MASK, temperature=2.0, chunk_size=4096)
    chunked = token_kd_loss(student, teacher, MASK, temperature=2.0, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_of(chunked, student), grad_of(whole, student), rtol=RTOL, atol=ATOL)


def test_token_kd_on_bf16_logits_is_computed_in_float32():
    student, teacher = logits_pair()
    student_bf16 = student.detach().bfloat16().requires_grad_()
    loss = token_kd_loss(student_bf16, teacher.bfloat16(), MASK, temperature=2.0, chunk_size=4)
    assert loss.dtype == torch.float32
    reference_input = student_bf16.detach().float().requires_grad_()  # the same values, upcast
    expected = reference_token_kd(reference_input, teacher.bfloat16(), MASK, 2.0)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    grad = grad_of(loss, student_bf16)
    assert grad.dtype == torch.bfloat16  # float32 gradient rounded once to bf16: bf16 tolerance
    torch.testing.assert_close(grad.float(), grad_of(expected, reference_input), rtol=1e-2, atol=1e-5)


def test_token_kd_with_no_kept_token_is_zero_with_zero_gradient():
    student, teacher = logits_pair()
    loss = token_kd_loss(student, teacher, torch.zeros(B, T), temperature=2.0)
    assert loss.item() == 0.0 and torch.equal(grad_of(loss, student), torch.zeros_like(student))


def heads(kind: str):
    """A student head and a wider float teacher head. Student kinds: a float Linear, a QuantLinear with
    a 4-bit weight (group 16), the same with 8-bit input quantization, and a small MLP (not a Linear:
    projected by calling it per chunk)."""
    teacher_head = nn.Linear(H + 2, V)
    if kind == "float":
        return nn.Linear(H, V), teacher_head
    if kind == "mlp":
        return nn.Sequential(nn.Linear(H, 8), nn.Tanh(), nn.Linear(8, V)), teacher_head
    activation = default_activation_config(8) if kind == "w4a8" else None
    config = LayerConfig(QuantizerConfig(bits=4, group_size=16), activation)
    return QuantLinear.from_float(nn.Linear(32, V), config), teacher_head


def in_features(head: nn.Module) -> int:
    return head[0].in_features if isinstance(head, nn.Sequential) else head.in_features


@pytest.mark.parametrize("kind", ["float", "w4", "w4a8", "mlp"])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_head_kd_matches_token_kd_on_the_full_logits(kind, chunk_size):
    student_head, teacher_head = heads(kind)
    student_hidden = torch.randn(B, T, in_features(student_head), requires_grad=True)
    teacher_hidden = torch.randn(B, T, teacher_head.in_features)
    if kind == "w4a8":
        student_head(student_hidden)  # the input quantizer's first call initializes its range
    trained = {name: p for name, p in student_head.named_parameters() if p.requires_grad}
    params = [student_hidden, *trained.values()]
    loss = head_kd_loss(student_hidden, teacher_hidden, student_head, teacher_head, MASK, 2.0, chunk_size)
    expected = reference_token_kd(student_head(student_hidden), teacher_head(teacher_hidden).detach(), MASK, 2.0)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    grads, expected_grads = torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)
    for name, grad, expected_grad in zip(["hidden", *trained], grads, expected_grads, strict=True):
        if name.startswith("input_quantizer."):
            # LSQ scales its gradient by 1 / sqrt(elements in the call): per chunk != whole (documented);
            # the zero point's gradient is 0 while nothing clips (min-max range)
            assert grad is not None and (grad.abs().sum() > 0 or name.endswith("zero_point")), name
            continue
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected_grad, rtol=RTOL, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher_head.parameters())


def test_head_kd_reaches_the_quantizer_scales():
    student_head, teacher_head = heads("w4")
    scales = [name for name, _ in student_head.named_parameters() if "scale" in name]
    assert scales, "a QuantLinear with an LSQ weight quantizer has a learnable scale"
    hidden = torch.randn(B, T, student_head.in_features)
    teacher_hidden = torch.randn(B, T, teacher_head.in_features)
    head_kd_loss(hidden, teacher_hidden, student_head, teacher_head, chunk_size=3).backward()
    named = dict(student_head.named_parameters())
    assert all(named[name].grad is not None and named[name].grad.abs().sum() > 0 for name in scales)


def reference_causal_lm(logits, labels, attention_mask):
    """Hugging Face's recipe: shift, -100 for padding targets, mean cross-entropy over the rest."""
    targets = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


LABELS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, -100, 3]])


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_causal_lm_loss_matches_the_shifted_cross_entropy(chunk_size):
    logits, _ = logits_pair()
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    loss = causal_lm_loss(logits, LABELS, attention_mask, chunk_size=chunk_size)
    expected = reference_causal_lm(logits, LABELS, attention_mask)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    grad = grad_of(loss, logits)
    torch.testing.assert_close(grad, grad_of(expected, logits), rtol=RTOL, atol=ATOL)
    # predictions whose target is padding / -100 / beyond the end get exactly nothing
    for row, col in [(0, 3), (0, 4), (1, 2), (1, 4)]:
        assert torch.equal(grad[row, col], torch.zeros(V))


def test_causal_lm_loss_from_hidden_states_and_a_head_matches_the_logits_path():
    head = nn.Linear(H, V)
    hidden = torch.randn(B, T, H, requires_grad=True)
    loss = causal_lm_loss(hidden, LABELS, head=head, chunk_size=3)
    expected = causal_lm_loss(head(hidden), LABELS, chunk_size=4096)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    params = [hidden, head.weight, head.bias]
    for grad, expected_grad in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params),
                                   strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=RTOL, atol=1e-6)


def test_masked_cross_entropy_without_shift_and_its_mask():
    logits, _ = logits_pair()
    targets = torch.randint(0, V, (B, T))
    loss = masked_cross_entropy(logits, targets, MASK, chunk_size=4)
    expected = F.cross_entropy(logits[MASK == 1], targets[MASK == 1])
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_of(loss, logits), grad_of(expected, logits), rtol=RTOL, atol=ATOL)


def test_mean_pool_averages_unmasked_tokens_like_sentence_transformers():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    assert torch.equal(pooled, torch.tensor([[2.0, 3.0]]))
    assert torch.equal(mean_pool(hidden, torch.zeros(1, 3)), torch.zeros(1, 2))  # all padding: 0, not NaN


def test_embedding_losses_against_hand_values():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0], [0.0, -3.0]], requires_grad=True)
    cosine = embedding_cosine_loss(student, teacher)  # rows: 1 - 1/sqrt(2), 1 - (-1) = 2
    torch.testing.assert_close(cosine, torch.tensor((1 - 2**-0.5 + 2.0) / 2))
    mse = embedding_mse_loss(student, teacher)  # (0 + 1 + 0 + 25) / 4
    assert mse.item() == 6.5
    (cosine + mse).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("call, message", [
    (lambda s, t: token_kd_loss(s, t[:, :, :-1]), "student shape"),
    (lambda s, t: token_kd_loss(s, t, temperature=0.0), "temperature=0.0 must be > 0"),
    (lambda s, t: token_kd_loss(s, t, chunk_size=0), "chunk_size=0 must be a positive integer"),
    (lambda s, t: token_kd_loss(s, t, mask=torch.ones(B, T + 1)), "mask shape"),
    (lambda s, t: masked_cross_entropy(s, torch.full((B, T), V)), f"target id {V} >= the {V} classes of the logits"),
    (lambda s, t: masked_cross_entropy(s, torch.full((B, T), -2)), "target id -2 is negative"),
    (lambda s, t: causal_lm_loss(s, LABELS[:, :3]), "must be (B, T, V or H) and (B, T)"),
    (lambda s, t: causal_lm_loss(s, LABELS, torch.ones(B, 2)), "attention_mask shape"),
    (lambda s, t: causal_lm_loss(s[..., :H], torch.full((B, T), V), head=nn.Linear(H, V)), f"target id {V} >="),
    (lambda s, t: head_kd_loss(s[..., :H], t[:, :2, :H], nn.Linear(H, V), nn.Linear(H, V)), "differ in their token"),
    (lambda s, t: head_kd_loss(s[..., :H], t[..., :H], nn.Linear(H, V), nn.Linear(H, V + 1)), "student shape"),
    (lambda s, t: mean_pool(s, torch.ones(B, T + 1)), "mean_pool: attention_mask"),
    (lambda s, t: embedding_cosine_loss(s[0], t[1, :2]), "embedding_cosine_loss"),
])
def test_bad_inputs_are_refused_with_a_clear_message(call, message):
    student, teacher = logits_pair(requires_grad=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(student, teacher)


def test_without_grad_mode_the_losses_give_the_same_value_and_build_no_graph():
    student, teacher = logits_pair()
    head, teacher_head = nn.Linear(H, V), nn.Linear(H, V)
    hidden = torch.randn(B, T, H, requires_grad=True)

    def four_losses():
        return [token_kd_loss(student, teacher, MASK, 2.0, 3), head_kd_loss(hidden, hidden, head, teacher_head, MASK),
                causal_lm_loss(student, LABELS, chunk_size=3), causal_lm_loss(hidden, LABELS, head=head, chunk_size=3)]

    with_grad = four_losses()
    with torch.no_grad():
        without = four_losses()
    for graph, plain in zip(with_grad, without, strict=True):
        assert graph.requires_grad and not plain.requires_grad and torch.equal(graph.detach(), plain)


def test_a_second_backward_through_the_same_loss_is_refused():
    student, teacher = logits_pair()
    loss = token_kd_loss(student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a chunked loss supports one backward pass"):
        loss.backward()
