"""Distillation: KD and feature losses against hand computations, feature taps, the callback's
teacher handling (frozen, bf16, loaded from files, checked on resume) and its loss terms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from torch import nn

from qat.distill import FeatureTaps, feature_cosine, feature_loss, feature_mse, kd_logit_loss
from qat.lightning.distillation import Distillation, weights_sha256
from qat.lightning.module import QATModule
from qat.models import DigitsCNN
from qat.recipe import DistillConfig, load_recipe
from qat.run.models import load_teacher


def hand_kd(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """T^2 * mean over rows of sum_c p_t (log p_t - log p_s), p = softmax(logits / T), in Python floats."""
    def log_softmax(row: list[float]) -> list[float]:
        scaled = [v / temperature for v in row]
        top = max(scaled)
        log_total = top + math.log(sum(math.exp(v - top) for v in scaled))
        return [v - log_total for v in scaled]

    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        log_s, log_t = log_softmax(s_row), log_softmax(t_row)
        total += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t, strict=True))
    return temperature**2 * total / len(student)


STUDENT = [[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]
TEACHER = [[1.0, 0.0, 2.0], [-1.0, 2.5, 0.5]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_the_hand_formula_scaled_by_t_squared(temperature):
    got = kd_logit_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), temperature)
    # float32 softmax vs float64 Python: a few ulps of the loss (~0.1..1)
    assert float(got) == pytest.approx(hand_kd(STUDENT, TEACHER, temperature), rel=1e-6, abs=1e-7)


def test_kd_gradient_is_t_times_softmax_difference_over_rows():
    # d/ds [T^2 KL(p_t || softmax(s/T))] = T (p_s - p_t), averaged over the B rows.
    temperature = 2.0
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    kd_logit_loss(student, teacher, temperature).backward()
    expected = temperature * ((student / temperature).softmax(-1) - (teacher / temperature).softmax(-1)) / 2
    torch.testing.assert_close(student.grad, expected.detach(), rtol=1e-6, atol=1e-7)
    assert teacher.grad is None  # the teacher is detached


def test_kd_loss_is_exactly_zero_for_equal_logits_and_treats_sequences_as_rows():
    logits = torch.randn(2, 5, 7)
    assert float(kd_logit_loss(logits, logits.clone(), 3.0)) == 0.0
    teacher = torch.randn(2, 5, 7)
    rows = kd_logit_loss(logits.reshape(10, 7), teacher.reshape(10, 7), 3.0)
    assert torch.equal(kd_logit_loss(logits, teacher, 3.0), rows)


def test_kd_loss_rejects_bad_shapes_and_temperatures():
    with pytest.raises(ValueError, match=r"student shape \(2, 3\) != teacher shape \(2, 4\)"):
        kd_logit_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kd_logit_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


def test_feature_losses_match_hand_values():
    student = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    teacher = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert float(feature_mse(student, teacher)) == (1 + 0 + 4 + 4) / 4
    # row 0: cos = 4 / (sqrt(5) * 2); row 1: cos = -1 / (1 * sqrt(5))
    expected = ((1 - 4 / (math.sqrt(5) * 2)) + (1 + 1 / math.sqrt(5))) / 2
    assert float(feature_cosine(student, teacher)) == pytest.approx(expected, rel=1e-6)


def test_feature_cosine_compares_each_sample_flattened():
    x = torch.randn(3, 4, 2, 2)
    assert float(feature_cosine(x, 2.5 * x)) == pytest.approx(0.0, abs=1e-6)  # same direction
    assert float(feature_cosine(x, -x)) == pytest.approx(2.0, abs=1e-6)  # opposite


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class TupleOut(nn.Module):
    def forward(self, x):
        return (x * 2, "not a tensor")


def test_feature_taps_keep_the_latest_outputs_and_can_be_removed():
    net = Net()
    taps = FeatureTaps(net, ["body"])
    x = torch.randn(5, 4)
    net(x)
    assert torch.equal(taps.outputs["body"], net.body(x))
    taps.remove()
    net(x)
    assert taps.outputs == {}
    wrapped = nn.Sequential(TupleOut())
    tuple_taps = FeatureTaps(wrapped, ["0"])
    wrapped(x)
    assert torch.equal(tuple_taps.outputs["0"], x * 2)


def test_feature_taps_name_unknown_layers_with_close_matches():
    with pytest.raises(ValueError, match=r"student has no layer named 'bodi'.*close matches: body"):
        FeatureTaps(Net(), ["bodi"], role="student")


def test_feature_loss_sums_the_mapped_pairs_and_names_mismatched_layers():
    student, teacher = Net(), Net()
    s_taps, t_taps = FeatureTaps(student, ["body", "head"]), FeatureTaps(teacher, ["body", "head"])
    x = torch.randn(5, 4)
    student(x), teacher(x)
    got = feature_loss(s_taps, t_taps, {"body": "body", "head": "head"}, "mse")
    expected = feature_mse(student.body(x), teacher.body(x)) + feature_mse(student(x), teacher(x))
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"features 'body' \(student\) -> 'head' \(teacher\)"):
        feature_loss(s_taps, t_taps, {"body": "head"})


# ---- the callback ----------------------------------------------------------------------------
def make_callback(teacher: nn.Module, **config) -> Distillation:
    callback = Distillation(DistillConfig(enabled=True, **config), teacher=teacher)
    callback._trainer = SimpleNamespace(global_step=0)
    return callback


def test_teacher_is_frozen_in_eval_mode_and_not_part_of_the_module_state():
    teacher = DigitsCNN()
    callback = make_callback(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    module = QATModule(DigitsCNN(), num_classes=10)
    callback.setup(SimpleNamespace(global_step=0), module, "fit")
    module.train()  # Lightning does this every epoch; the teacher is not a submodule, so it stays in eval
    assert not callback.teacher.training
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}
    assert callback.state_dict() == {"source": "initial", "file": None, "sha256": weights_sha256(teacher)}


def test_kd_weight_follows_its_start_and_linear_ramp():
    callback = make_callback(Net(), weight=0.5, start_step=10, ramp_steps=4)
    assert [callback.ramp(s) for s in (0, 9, 10, 11, 12, 13, 14, 100)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    x, student = torch.randn(6, 4), Net()
    logits = student(x)
    callback._trainer.global_step = 11
    terms = callback.loss_terms(x, logits, torch.zeros(6, dtype=torch.long))
    expected = 0.5 * 0.5 * kd_logit_loss(logits, callback.teacher(x), 2.0)
    assert set(terms) == {"kd"} and torch.equal(terms["kd"], expected)
    callback._trainer.global_step = 9
    assert callback.loss_terms(x, logits, None) == {}


def test_labels_free_module_uses_only_the_distillation_terms():
    teacher = DigitsCNN()
    callback = make_callback(teacher, task_weight=0.0, features={"features.3": "features.3"}, feature_loss="cosine")
    module = QATModule(DigitsCNN(), num_classes=10)
    callback.setup(SimpleNamespace(global_step=0), module, "fit")
    assert module.task_loss_weight == 0.0
    x = torch.rand(4, 1, 8, 8)
    terms = module.loss_terms(x, torch.full((4,), -1), module(x))  # labels of -1 would break cross entropy
    assert set(terms) == {"kd", "feature"}
    module.loss_hooks.clear()
    with pytest.raises(RuntimeError, match="labels-free"):
        module.loss_terms(x, None, module(x))


def test_bf16_teacher_runs_in_bf16_and_gives_float32_logits():
    teacher = DigitsCNN().eval()
    x = torch.rand(8, 1, 8, 8)
    reference = teacher(x)
    callback = make_callback(teacher, teacher_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in callback.teacher.parameters())
    logits = callback.teacher_logits(x)
    assert logits.dtype == torch.float32
    # bf16 keeps 8 significant bits: logits of magnitude ~0.1-1 agree to a few 1e-2
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05)


def test_resume_refuses_a_different_teacher():
    callback = make_callback(Net())
    saved = callback.state_dict()
    other = make_callback(Net())
    with pytest.raises(ValueError, match="not the one this checkpoint was trained with"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="the recipe says 'initial'"):
        other.load_state_dict({**saved, "source": "warmup"})


def test_teacher_from_a_safetensors_state_dict_leaves_the_global_rng_alone(tmp_path):
    trained = DigitsCNN()
    path = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(trained.state_dict(), str(path))
    recipe = load_recipe(None, [f"distill.teacher={path}"])
    state = torch.get_rng_state()
    teacher = load_teacher(str(path), recipe)
    assert torch.equal(torch.get_rng_state(), state)
    assert weights_sha256(teacher) == weights_sha256(trained)


def test_teacher_from_a_hugging_face_directory_is_the_pretrained_model(tmp_path):
    from tests.qat.hf.tiny_models import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "teacher", seed=3)
    state = torch.get_rng_state()
    teacher = load_teacher(str(folder), load_recipe(None, ["task=causal_lm"]))
    assert torch.equal(torch.get_rng_state(), state)
    assert type(teacher).__name__ == "LlamaForCausalLM"
    torch.manual_seed(3)
    from transformers import LlamaForCausalLM

    from tests.qat.hf.tiny_models import tiny_llama_config

    assert weights_sha256(teacher) == weights_sha256(LlamaForCausalLM(tiny_llama_config()))


def test_unknown_teacher_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not 'initial', 'warmup', a \.ckpt file"):
        load_teacher(str(tmp_path / "nope.bin"), load_recipe(None))
