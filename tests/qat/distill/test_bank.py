"""Neighbourhood distillation against a teacher bank (`qat.distill.bank`): hand values on a 3-sentence bank,
a hand-derived gradient, the sentence's own entry left out, top-k, its recipe keys and the callback's term."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qat.config import ConfigError
from qat.data.sentences import PadCollate
from qat.distill.bank import bank_cosines, bank_relation_loss, teacher_bank
from qat.lightning.distillation import Distillation
from qat.lightning.module import QATModule
from qat.recipe import DistillConfig, load_recipe
from tests.qat.distill.test_embedding import TinyEncoder

# A 2-d bank whose cosines are exact in binary: b0 = (1, 0), b1 = (0, 1), b2 = (0.6, 0.8).
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
TEACHER = torch.tensor([[1.0, 0.0]])  # sentence 0 of the bank: its own entry (cosine 1) is left out
STUDENT = torch.tensor([[0.8, 0.6]])  # cosines to the bank (0.8, 0.6, 0.96); the teacher's (1, 0, 0.6)


def _softmax2(a: float, b: float) -> tuple[float, float]:
    return 1.0 / (1.0 + math.exp(b - a)), 1.0 / (1.0 + math.exp(a - b))


def test_kl_on_a_three_sentence_bank_is_the_hand_value():
    # Kept entries b1, b2: teacher cosines (0, 0.6), student (0.6, 0.96); at temperature 0.5 the logits are
    # (0, 1.2) and (1.2, 1.92), so KL = sum_j p_t,j log(p_t,j / p_s,j) over the two kept entries.
    p_t, p_s = _softmax2(0.0, 1.2), _softmax2(1.2, 1.92)
    expected = sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))
    got = bank_relation_loss(STUDENT, TEACHER, BANK, "kl", temperature=0.5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_mse_on_a_three_sentence_bank_is_the_hand_value():
    # Kept differences 0.6 - 0 and 0.96 - 0.6: (0.36 + 0.1296) / 2.
    got = bank_relation_loss(STUDENT, TEACHER, BANK, "mse")
    assert got.item() == pytest.approx(0.2448, rel=1e-6)


def test_kl_gradient_matches_the_hand_derivation():
    # dL/dcos(s, b_j) = (p_s,j - p_t,j) / tau over the kept j; s is a unit vector, so
    # dL/ds = (I - s s^T) sum_j dL/dcos_j b_j.
    p_t, p_s = _softmax2(0.0, 1.2), _softmax2(1.2, 1.92)
    weights = [(p_s[0] - p_t[0]) / 0.5, (p_s[1] - p_t[1]) / 0.5]  # for b1 = (0, 1), b2 = (0.6, 0.8)
    raw = torch.tensor([weights[1] * 0.6, weights[0] + weights[1] * 0.8], dtype=torch.float64)
    s = STUDENT[0].double()
    expected = (raw - (raw @ s) * s).float().unsqueeze(0)
    student = STUDENT.clone().requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    bank_relation_loss(student, teacher, BANK, "kl", temperature=0.5).backward()
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-6)
    assert teacher.grad is None  # the teacher is detached
    # The student over-weights b2 (p_s,2 > p_t,2): a small step against the gradient lowers its cosine to b2.
    stepped = F.normalize(STUDENT - 0.01 * student.grad, dim=-1)
    assert (stepped @ BANK[2]).item() < (STUDENT @ BANK[2]).item()


def test_a_step_against_the_gradient_lowers_either_loss():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(40, 8), dim=-1)
    teacher = bank[:5] + 0.001 * torch.randn(5, 8)  # five training sentences (padding-level rounding)
    for kind, top_k in (("kl", None), ("kl", 8), ("mse", None), ("mse", 8)):
        student = (teacher + 0.2 * torch.randn(5, 8)).requires_grad_()
        loss = bank_relation_loss(student, teacher, bank, kind, temperature=0.1, top_k=top_k)
        loss.backward()
        after = bank_relation_loss(student.detach() - 0.01 * student.grad / student.grad.norm(), teacher, bank, kind,
                                   temperature=0.1, top_k=top_k)
        assert torch.isfinite(student.grad).all() and after < loss, (kind, top_k)


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_zero_when_the_student_is_the_teacher(kind, top_k):
    torch.manual_seed(1)
    bank = torch.randn(12, 6)
    teacher = bank[[2, 7]] * 3.0  # embeddings need not be normalized
    assert bank_relation_loss(teacher.clone(), teacher, bank, kind, 0.05, top_k).abs().item() < 1e-6


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_the_sentence_itself_is_left_out_of_its_bank_row(kind):
    # Rows 0-2 of the batch are bank sentences 4, 0, 9: the loss is the one against the bank without
    # each row's own entry (computed row by row), however far the student is from its teacher.
    torch.manual_seed(2)
    bank = F.normalize(torch.randn(10, 5), dim=-1)
    rows = [4, 0, 9]
    teacher, student = bank[rows], torch.randn(3, 5)
    _, _, kept = bank_cosines(student, teacher, bank)
    assert [kept[i].logical_not().nonzero().flatten().tolist() for i in range(3)] == [[4], [0], [9]]
    got = bank_relation_loss(student, teacher, bank, kind, 0.05)
    others = [torch.cat([bank[:r], bank[r + 1:]]) for r in rows]
    if kind == "kl":
        expected = torch.stack([bank_relation_loss(student[i:i + 1], teacher[i:i + 1], others[i], kind, 0.05)
                                for i in range(3)]).mean()
    else:  # every row keeps 9 entries: the mean over all kept pairs is the mean of the row means
        unit = F.normalize(student, dim=-1)
        expected = torch.stack([(unit[i] @ others[i].T - teacher[i] @ others[i].T).square().mean()
                                for i in range(3)]).mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_top_k_keeps_the_teachers_nearest_other_entries():
    torch.manual_seed(3)
    bank = F.normalize(torch.randn(20, 6), dim=-1)
    teacher, student = bank[[5]], torch.randn(1, 6)
    _, teacher_cos, kept = bank_cosines(student, teacher, bank, top_k=4)
    others = teacher_cos[0].clone()
    others[5] = -2.0  # itself: never among the nearest
    nearest = others.topk(4).indices
    assert sorted(kept[0].nonzero().flatten().tolist()) == sorted(nearest.tolist())
    for kind in ("kl", "mse"):
        restricted = bank_relation_loss(student, teacher, bank[nearest], kind, 0.05)
        torch.testing.assert_close(bank_relation_loss(student, teacher, bank, kind, 0.05, top_k=4), restricted)
    # k at least the bank size: the whole bank (but the sentence itself)
    torch.testing.assert_close(bank_relation_loss(student, teacher, bank, "kl", 0.05, top_k=50),
                               bank_relation_loss(student, teacher, bank, "kl", 0.05))


def test_bad_arguments_are_refused():
    s, t, bank = torch.randn(2, 4), torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"student \(2, 4\) and teacher \(2, 5\) embeddings must both be \(B, H\)"):
        bank_relation_loss(s, torch.randn(2, 5), bank)
    with pytest.raises(ValueError, match=r"bank \(5, 3\) must be \(N, 4\)"):
        bank_relation_loss(s, t, torch.randn(5, 3))
    with pytest.raises(ValueError, match="bank loss 'l2' is not valid; allowed: kl, mse"):
        bank_relation_loss(s, t, bank, "l2")
    with pytest.raises(ValueError, match=r"temperature=0\.0 must be > 0"):
        bank_relation_loss(s, t, bank, temperature=0.0)
    with pytest.raises(ValueError, match="top_k=0 must be >= 1"):
        bank_relation_loss(s, t, bank, top_k=0)
    with pytest.raises(ValueError, match="no batches to embed"):
        teacher_bank(lambda batch: batch, [])


@pytest.mark.parametrize(("override", "message"), [
    ("distill.bank_weight=-1", r"distill\.bank_weight=-1\.0 must be >= 0"),
    ("distill.bank_loss=cosine", r"distill\.bank_loss='cosine' is not valid; allowed: 'kl', 'mse'"),
    ("distill.bank_temperature=0", r"distill\.bank_temperature=0\.0 must be > 0"),
    ("distill.bank_top_k=0", r"distill\.bank_top_k=0 must be >= 1, or null for the whole bank"),
    ("distill.bank_topk=5", r"unknown recipe key 'distill\.bank_topk' \(did you mean 'bank_top_k'\?\)"),
])
def test_recipe_refuses_bad_bank_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("recipes/minilm_w4_kd.yaml", [override])


def test_recipe_refuses_a_bank_outside_the_embedding_task():
    assert load_recipe("recipes/minilm_w4_kd.yaml").distill.bank_weight == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"distill\.bank_weight=1\.0 .* needs task 'embedding', not 'classif"):
        load_recipe(None, ["distill.enabled=true", "distill.bank_weight=1.0"])


def test_callback_builds_the_bank_from_the_training_set_and_adds_its_term():
    sentences = [[1, 2, 3], [4, 5], [6, 7, 8], [9, 1, 1], [3, 3], [2, 5, 7]]
    samples = [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long)}
               for ids in sentences]
    shuffled = DataLoader(samples, batch_size=4, shuffle=True, collate_fn=PadCollate(0))  # the bank ignores order
    trainer = SimpleNamespace(global_step=0, datamodule=SimpleNamespace(train_dataloader=lambda: shuffled))
    teacher, student = TinyEncoder(0), TinyEncoder(1)
    config = DistillConfig(enabled=True, task_weight=0.0, bank_weight=2.0, bank_loss="kl", bank_temperature=0.1)
    callback = Distillation(config, teacher=teacher)
    module = QATModule(student, task="embedding")
    callback.setup(trainer, module, "fit")
    batch = PadCollate(0)([samples[4], samples[1]])
    output = module.task_spec.forward(student, batch)  # (2, 6) unit rows
    terms = callback.loss_terms(batch, output, None)

    every = PadCollate(0)(samples)
    expected_bank = F.normalize(module.task_spec.forward(teacher, every), dim=-1)  # (6, 6), training order
    torch.testing.assert_close(callback.bank, expected_bank)
    teacher_out = module.task_spec.forward(teacher, batch)
    expected = 2.0 * bank_relation_loss(output, teacher_out, expected_bank, "kl", 0.1)
    assert set(terms) == {"kd", "bank"} and terms["bank"].item() > 0
    torch.testing.assert_close(terms["bank"], expected)
    first = callback.bank
    callback.loss_terms(batch, output, None)
    assert callback.bank is first  # built once

    other = Distillation(DistillConfig(enabled=True, bank_weight=1.0), teacher=nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"distill\.bank_weight=1\.0 .* needs task 'embedding', not 'classif"):
        other.setup(trainer, QATModule(nn.Linear(4, 3), num_classes=3), "fit")
