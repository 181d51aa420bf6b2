"""Model-wide switches and calibration of a prepared model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat.config import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.control import (
    calibrate,
    calibration,
    freeze,
    init_weight_ranges,
    quantizer_parameters,
    quantizers,
    set_fake_quant,
)
from qat.functional import choose_qparams
from qat.swap import prepare


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    act = QuantizerConfig(
        bits=8, symmetric=False, quantizer="lsq_plus", granularity="tensor", init="minmax", scale_dtype="float32"
    )
    spec = QuantSpec(
        weight=QuantizerConfig(bits=4, group_size=16, init="minmax"),
        activation=act,
        rules=[QuantRule(name="2", quantize_activations=False)],
    )
    return prepare(model, spec)[0]


def test_quantizers_lists_names_and_filters_by_role():
    model = make_model()
    assert [name for name, _ in quantizers(model)] == ["0.weight_quantizer", "0.input_quantizer", "2.weight_quantizer"]
    assert [name for name, _ in quantizers(model, "activation")] == ["0.input_quantizer"]
    assert len(list(quantizers(model, "weight"))) == 2
    params = quantizer_parameters(model)
    assert len(params) == 6 and all(isinstance(p, nn.Parameter) for p in params)
    model_param_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in model_param_ids for p in params)  # they are the model's own parameters


def test_set_fake_quant_turns_roles_on_and_off():
    model = make_model()
    x = torch.randn(4, 32)
    model(x)  # initialize the activation range
    set_fake_quant(model, weights=False, activations=False)
    assert all(not q.enabled for _, q in quantizers(model))
    float_out = nn.Sequential(model[0].to_float(), nn.ReLU(), model[2].to_float())(x)
    assert torch.equal(model(x), float_out)
    set_fake_quant(model, weights=True)  # activations left as they are
    assert [q.enabled for _, q in quantizers(model)] == [True, False, True]


def test_freeze_one_role_then_all():
    model = make_model()
    freeze(model, role="weight")
    assert [q.scale.requires_grad for _, q in quantizers(model)] == [False, True, False]
    freeze(model)
    assert not any(p.requires_grad for p in quantizer_parameters(model))
    freeze(model, frozen=False)
    states = [(q.scale.requires_grad, q.zero_point.requires_grad) for _, q in quantizers(model)]
    assert states == [(True, False), (True, True), (True, False)]


def test_calibrate_sets_activation_range_from_all_batches_and_restores_mode():
    model = make_model().train()
    batches = [torch.randn(4, 32), (torch.randn(4, 32) * 3, torch.zeros(4))]  # a tensor, and a (input, target) pair
    seen = calibrate(model, batches)
    assert seen == 2 and model.training
    data = torch.cat([batches[0], batches[1][0]])
    scale, zero = choose_qparams(data.min(), data.max(), 8, False)
    quantizer = model[0].input_quantizer
    assert quantizer.initialized and not quantizer.calibrating
    assert torch.equal(quantizer.scale.detach(), scale) and torch.equal(quantizer.zero_point.detach(), zero)


def test_calibration_context_re_initializes_weight_ranges():
    model = make_model()
    with torch.no_grad():
        model[0].weight.mul_(2)
    before = model[0].weight_quantizer.scale.detach().clone()
    with calibration(model):
        x = torch.randn(2, 32)
        assert torch.equal(model[0].input_quantizer(x), x)  # calibrating: values pass through
    torch.testing.assert_close(model[0].weight_quantizer.scale.detach(), before * 2, rtol=1e-6, atol=0)


def test_weight_only_calibration_counts_batches_without_running_them():
    model = prepare(nn.Sequential(nn.Linear(32, 8)), QuantSpec(weight=QuantizerConfig(bits=4, group_size=16)))[0]
    with torch.no_grad():
        model[0].weight.mul_(2)
    before = model[0].weight_quantizer.scale.detach().clone()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    assert calibrate(model, [torch.randn(4, 32), torch.randn(4, 32)]) == 2
    assert forwards == []  # no activation quantizer to observe: ranges come from the weights alone
    torch.testing.assert_close(model[0].weight_quantizer.scale.detach(), before * 2, rtol=1e-6, atol=0)
    full = make_model()
    full.register_forward_hook(lambda *_: forwards.append(1))
    calibrate(full, [torch.randn(4, 32)])
    assert forwards == [1]


def test_calibration_without_batches_leaves_activations_uninitialized():
    model = make_model()
    with calibration(model, weights=False):
        pass
    assert not model[0].input_quantizer.initialized  # the first training batch will set its range


def test_init_weight_ranges_after_weight_change():
    model = make_model()
    with torch.no_grad():
        model[2].weight.mul_(0.5)
    before = model[2].weight_quantizer.scale.detach().clone()
    init_weight_ranges(model)
    torch.testing.assert_close(model[2].weight_quantizer.scale.detach(), before * 0.5, rtol=1e-6, atol=0)


def test_default_activation_config_round_trip_through_prepare():
    model = prepare(nn.Sequential(nn.Linear(16, 4)), QuantSpec(weight=None, activation=default_activation_config(4)))[0]
    ((name, quantizer),) = quantizers(model)
    assert name == "0.input_quantizer" and (quantizer.config.qmin, quantizer.config.qmax) == (0, 15)
