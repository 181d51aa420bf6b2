"""Similarity-structure distillation of sentence embeddings (`embedding_relation_loss`): hand values, a
hand-derived gradient, what the loss is blind to, its recipe key and its term in the distillation callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qat.config import ConfigError
from qat.distill import embedding_cosine_loss, embedding_relation_loss
from qat.lightning.distillation import Distillation
from qat.lightning.module import QATModule
from qat.recipe import DistillConfig, load_recipe

# Rows whose normalized pairwise cosines are exact in binary: 3-4-5 triangles and axis vectors.
STUDENT = [[3.0, 4.0], [4.0, -3.0], [2.0, 0.0]]  # unit rows (0.6, 0.8), (0.8, -0.6), (1, 0)
TEACHER = [[1.0, 0.0], [0.0, 1.0], [0.0, 5.0]]  # unit rows (1, 0), (0, 1), (0, 1)


def test_relation_loss_is_the_mean_squared_cosine_difference_over_ordered_pairs():
    # student cosines (01, 02, 12) = (0, 0.6, 0.8); teacher (0, 0, 1); differences 0, 0.6, -0.2.
    # Each unordered pair counts twice among the 3 * 2 ordered pairs: 2 * (0 + 0.36 + 0.04) / 6.
    got = embedding_relation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(0.4 / 3, rel=1e-6)  # float32 products of 0.6 / 0.8: a few ulps


def test_relation_loss_gradient_matches_the_hand_derivation():
    # L = 1/(B(B-1)) sum_{i != j} (u_i.u_j - c_ij)^2 with u_i = s_i / |s_i|, so
    # dL/du_i = 4/(B(B-1)) sum_{j != i} (u_i.u_j - c_ij) u_j and dL/ds_i = (I - u_i u_i^T) dL/du_i / |s_i|.
    # B = 2, s = (1, 0), (0, 2); teacher cosine 0.6; difference 0 - 0.6:
    # dL/du_0 = 2 * (-0.6) * (0, 1) = (0, -1.2), already orthogonal to u_0 = (1, 0), |s_0| = 1 -> (0, -1.2);
    # dL/du_1 = 2 * (-0.6) * (1, 0) = (-1.2, 0), orthogonal to u_1 = (0, 1), |s_1| = 2 -> (-0.6, 0).
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    loss = embedding_relation_loss(student, teacher)
    assert loss.item() == pytest.approx(0.36, rel=1e-6)  # 0.6 is not exact in float32
    loss.backward()
    torch.testing.assert_close(student.grad, torch.tensor([[0.0, -1.2], [-0.6, 0.0]]), rtol=1e-6, atol=1e-7)
    assert teacher.grad is None  # the teacher is detached


def test_relation_loss_gradient_agrees_with_finite_differences_in_float64():
    # gradcheck needs float64 inputs; the loss computes in float32, so the finite differences (eps 1e-3)
    # are float32-accurate only: tolerances ~1e-3 of the gradient entries (~0.1).
    torch.manual_seed(0)
    student = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: embedding_relation_loss(s, teacher).double(), (student,),
                                    eps=1e-3, atol=2e-3, rtol=2e-3)


def test_relation_loss_ignores_what_keeps_every_pairwise_cosine():
    # A common rotation and a positive scale per row change no cosine between rows: zero relation loss,
    # while the per-sentence cosine loss sees the rotation. Exact up to float32 rounding of the rotation.
    torch.manual_seed(1)
    teacher = torch.randn(6, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    student = (teacher @ rotation) * torch.tensor([[0.5], [1.0], [2.0], [3.0], [0.1], [7.0]])
    assert embedding_relation_loss(student, teacher).item() < 1e-11
    assert embedding_cosine_loss(student, teacher).item() > 0.1
    assert embedding_relation_loss(teacher, teacher).item() == 0.0


def test_relation_loss_of_one_sentence_is_zero_and_bad_shapes_are_refused():
    assert embedding_relation_loss(torch.randn(1, 4), torch.randn(1, 4)).item() == 0.0
    with pytest.raises(ValueError, match=r"embedding_relation_loss: student shape \(3, 4\) != teacher shape"):
        embedding_relation_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"embeddings must be \(B, H\), got \(2, 3, 4\)"):
        embedding_relation_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


@pytest.mark.parametrize("value", ["-0.5", "nan"])
def test_recipe_refuses_a_negative_or_nan_relation_weight(value):
    with pytest.raises(ConfigError, match=f"distill.relation_weight={value} must be >= 0"):
        load_recipe("recipes/minilm_w4_kd.yaml", [f"distill.relation_weight={value}"])


def test_recipe_refuses_a_relation_weight_outside_the_embedding_task():
    assert load_recipe("recipes/minilm_w4_kd.yaml").distill.relation_weight == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"distill\.relation_weight=1\.0 .* needs task 'embedding', not 'classif"):
        load_recipe(None, ["distill.enabled=true", "distill.relation_weight=1.0"])


class TinyEncoder(nn.Module):
    """Token embeddings as hidden states: an encoder for task 'embedding' (mean pooling of (B, T, H))."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.table = nn.Embedding(20, 6, _weight=torch.randn(20, 6, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        return self.table(input_ids)  # (B, T, H)


def test_callback_adds_the_relation_term_only_for_embeddings():
    teacher, student = TinyEncoder(0), TinyEncoder(1)
    callback = Distillation(DistillConfig(enabled=True, task_weight=0.0, relation_weight=3.0), teacher=teacher)
    module = QATModule(student, task="embedding")
    callback.setup(SimpleNamespace(global_step=0), module, "fit")
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 1, 1]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])}
    output = module.task_spec.forward(student, batch)  # (4, 6) unit rows
    terms = callback.loss_terms(batch, output, None)
    expected = 3.0 * embedding_relation_loss(output, module.task_spec.forward(teacher, batch))
    assert set(terms) == {"kd", "relation"} and torch.equal(terms["relation"], expected)
    assert terms["relation"].item() > 0

    other = Distillation(DistillConfig(enabled=True, relation_weight=3.0), teacher=nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"distill\.relation_weight=3\.0 .* needs task 'embedding', not 'classif"):
        other.setup(SimpleNamespace(global_step=0), QATModule(nn.Linear(4, 3), num_classes=3), "fit")
