"""GPTQ rounding (qat.ptq): the math on one weight, and a prepared model rounded from calibration batches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat.config import QuantizerConfig, QuantSpec
from qat.control import calibrate, set_fake_quant
from qat.export.pack import quantized_codes
from qat.functional import dequantize, effective_qparams
from qat.ptq import GPTQError, collect_second_moments, gptq_layers, gptq_quantize, gptq_round
from qat.ptq.gptq import activation_order
from qat.recipe import ScheduleConfig
from qat.swap import prepare

ASYM4 = QuantizerConfig(bits=4, symmetric=False, group_size=32, quantizer="lsq_plus", init="mse")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def correlated_inputs(tokens: int, features: int) -> torch.Tensor:
    """(tokens, features) inputs with strongly correlated features: a fixed random mixing (one per feature
    count) of a quarter as many sources, plus a little noise."""
    mixing = torch.randn(features // 4, features, generator=torch.Generator().manual_seed(features))
    sources = torch.randn(tokens, features // 4)
    return sources @ mixing + 0.05 * torch.randn(tokens, features)


def nearest(weight: torch.Tensor, config: QuantizerConfig) -> nn.Module:
    """A prepared Linear holding `weight`, round-to-nearest with the config's range init."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return prepare(nn.Sequential(layer), QuantSpec(weight=config))[0][0]


def test_identity_hessian_is_round_to_nearest_exactly():
    weight = torch.randn(16, 128)
    result = gptq_quantize(weight, torch.eye(128), ASYM4)
    rtn = nearest(weight, ASYM4)
    assert torch.equal(result.weight, weight)  # no error feedback with a diagonal H
    assert torch.equal(result.scale, rtn.weight_quantizer.qparams()[0])
    assert torch.equal(result.zero_point, rtn.weight_quantizer.qparams()[1])
    codes, _, _ = quantized_codes(rtn.weight_quantizer, rtn.weight)
    assert torch.equal(result.codes, codes.float() + ASYM4.qmin)


@pytest.mark.parametrize("config", [ASYM4, QuantizerConfig(bits=4, granularity="channel", init="minmax"),
                                    QuantizerConfig(bits=3, symmetric=False, granularity="tensor", init="minmax")])
def test_gptq_output_error_is_below_round_to_nearest(config):
    x = correlated_inputs(512, 128)  # (T, K)
    weight = torch.randn(24, 128)
    result = gptq_quantize(weight, x.T @ x / x.shape[0], config)
    rtn = nearest(weight, config)
    scale, zero = result.scale, result.zero_point
    if config.granularity == "group":
        scale, zero = scale.repeat_interleave(config.group_size, 1), zero.repeat_interleave(config.group_size, 1)
    elif config.granularity == "channel":
        scale, zero = scale[:, None], zero[:, None]
    gptq_weight = dequantize(result.codes, scale, zero)
    gptq_error = torch.linalg.norm(x @ weight.T - x @ gptq_weight.T)
    rtn_error = torch.linalg.norm(x @ weight.T - x @ rtn.weight_quantizer(rtn.weight).T)
    assert gptq_error < 0.7 * rtn_error, (float(gptq_error), float(rtn_error))


CHANNEL4 = QuantizerConfig(bits=4, granularity="channel", init="minmax")


def test_act_order_is_gptq_on_columns_sorted_by_input_energy():
    """Per-channel ranges do not depend on the column order, so act-order must be plain GPTQ run on the
    columns permuted by decreasing H diagonal, then permuted back: exactly, as the same float ops run."""
    x = correlated_inputs(512, 128) * torch.linspace(0.2, 3.0, 128)  # distinct input energies
    hessian, weight = x.T @ x / x.shape[0], torch.randn(24, 128)
    order = activation_order(hessian)
    assert torch.equal(hessian.diagonal()[order], hessian.diagonal().sort(descending=True).values)
    permuted = gptq_quantize(weight[:, order], hessian[order][:, order], CHANNEL4)
    result = gptq_quantize(weight, hessian, CHANNEL4, act_order=True)
    inverse = torch.argsort(order)
    assert torch.equal(result.codes, permuted.codes[:, inverse])
    assert torch.equal(result.weight, permuted.weight[:, inverse])
    assert torch.equal(result.scale, permuted.scale) and result.loss == permuted.loss
    assert not torch.equal(order, torch.arange(128))  # the test would not notice a missing permutation


def test_act_order_groups_take_their_ranges_from_the_original_weight():
    """Groups stay contiguous original columns; their ranges are round-to-nearest's, fixed before the loop,
    and a diagonal H (no feedback) gives round-to-nearest's codes exactly, in any column order."""
    weight = torch.randn(16, 128)
    rtn = nearest(weight, ASYM4)
    rtn_codes, _, _ = quantized_codes(rtn.weight_quantizer, rtn.weight)
    diagonal = torch.diag(torch.rand(128) + 0.5)
    result = gptq_quantize(weight, diagonal, ASYM4, act_order=True)
    assert torch.equal(result.scale, rtn.weight_quantizer.qparams()[0])
    assert torch.equal(result.zero_point, rtn.weight_quantizer.qparams()[1])
    assert torch.equal(result.codes, rtn_codes.float() + ASYM4.qmin) and torch.equal(result.weight, weight)
    x = correlated_inputs(512, 128)
    fed_back = gptq_quantize(weight, x.T @ x / 512, ASYM4, act_order=True)
    assert torch.equal(fed_back.scale, result.scale)  # static: the error feedback does not move them
    assert not torch.equal(fed_back.codes, result.codes)


def test_act_order_output_error_is_below_round_to_nearest():
    x = correlated_inputs(512, 128) * torch.linspace(0.2, 3.0, 128)
    weight = torch.randn(24, 128)
    result = gptq_quantize(weight, x.T @ x / x.shape[0], ASYM4, act_order=True)
    group = ASYM4.group_size
    deq = dequantize(result.codes, result.scale.repeat_interleave(group, 1),
                     result.zero_point.repeat_interleave(group, 1))
    rtn = nearest(weight, ASYM4)
    error = torch.linalg.norm(x @ weight.T - x @ deq.T)
    assert error < 0.7 * torch.linalg.norm(x @ weight.T - x @ rtn.weight_quantizer(rtn.weight).T)


def make_model(features: int = 64, config: QuantizerConfig = ASYM4) -> nn.Module:
    model = nn.Sequential(nn.Linear(features, 48), nn.GELU(), nn.Linear(48, 32), nn.Linear(32, 8))
    return prepare(model, QuantSpec(weight=config))[0]


def batches_of(features: int, count: int = 3) -> list[torch.Tensor]:
    return [correlated_inputs(128, features) for _ in range(count)]


@pytest.mark.parametrize("act_order", [False, True])
def test_model_fake_quant_weights_are_gptq_codes_exactly(act_order):
    model, batches = make_model(), batches_of(64)
    calibrate(model, batches)
    expected_model = copy.deepcopy(model)
    layers = gptq_layers(expected_model)
    moments = collect_second_moments(expected_model, layers, batches)
    expected = {name: gptq_quantize(m.weight, moments[name].hessian(), m.weight_quantizer.config, name=name,
                                    act_order=act_order)
                for name, m in layers.items()}
    losses = gptq_round(model, batches, act_order=act_order)
    assert set(losses) == {"0", "2", "3"}
    for name, module in gptq_layers(model).items():
        quantizer, result = module.weight_quantizer, expected[name]
        assert torch.equal(module.weight, result.weight)
        qmin = quantizer.config.qmin
        codes, scales, zeros = quantized_codes(quantizer, module.weight)  # what export stores
        assert torch.equal(codes.float() + qmin, result.codes)
        assert torch.equal(scales, result.scale) and torch.equal(zeros + qmin, result.zero_point)
        scale, zero = effective_qparams(quantizer.scale, quantizer.zero_point, qmin,
                                        quantizer.config.qmax, quantizer.config.torch_scale_dtype)
        assert torch.equal(scale, result.scale) and torch.equal(zero, result.zero_point)
        group = quantizer.config.group_size
        deq = dequantize(result.codes, scale.repeat_interleave(group, 1), zero.repeat_interleave(group, 1))
        assert torch.equal(quantizer(module.weight), deq)  # the training forward computes with GPTQ's weights


def test_act_order_reuses_the_ranges_a_quantizer_set_from_the_same_weight(monkeypatch):
    """gptq_round(act_order=True) takes a layer's static group ranges from its quantizer when they were set from
    this very weight (no second range search), searches them again once the weight has changed; same codes."""
    import qat.ptq.gptq as gptq

    model, batches = make_model(), batches_of(64)
    calibrate(model, batches)
    stale = copy.deepcopy(model)  # a copy's quantizers do not know their source: they search again
    with torch.no_grad():  # layer "2" changed in place (as an optimizer step would) after its ranges were set
        model[2].weight.mul_(1.5)
        stale[2].weight.mul_(1.5)
    searched = []
    search = gptq._range
    monkeypatch.setattr(gptq, "_range", lambda config, rows: searched.append(rows.shape) or search(config, rows))
    gptq_round(model, batches, act_order=True)
    group = model[2].weight_quantizer.config.group_size
    assert searched == [(32 * 48 // group, group)]  # layer "2" only: its (N * G, group size) rows
    searched.clear()
    gptq_round(stale, batches, act_order=True)
    assert len(searched) == 3
    for a, b in zip(gptq_layers(model).values(), gptq_layers(stale).values(), strict=True):  # given = searched
        assert torch.equal(a.weight, b.weight)
        (scale_a, zero_a), (scale_b, zero_b) = a.weight_quantizer.qparams(), b.weight_quantizer.qparams()
        assert torch.equal(scale_a, scale_b) and torch.equal(zero_a, zero_b)


def test_gptq_round_lowers_the_model_output_error():
    model, batches = make_model(), batches_of(64)
    calibrate(model, batches)
    reference = copy.deepcopy(model)
    set_fake_quant(reference, weights=False)
    rtn = copy.deepcopy(model)
    gptq_round(model, batches)
    test = correlated_inputs(256, 64)
    with torch.no_grad():
        target = reference(test)
        assert (model(test) - target).norm() < 0.8 * (rtn(test) - target).norm()


def test_group_size_must_divide_in_features():
    with pytest.raises(GPTQError, match="layer 'fc': group_size=32 does not divide in_features=48"):
        gptq_quantize(torch.randn(8, 48), torch.eye(48), ASYM4, name="layer 'fc'")


def test_prepare_divisor_fallback_group_size_is_used():
    model = make_model(features=80)  # 80 = 16 * 5: prepare falls back from 32 to groups of 16
    batches = batches_of(80)
    calibrate(model, batches)
    gptq_round(model, batches)
    assert model[0].weight_quantizer.scale.shape == (48, 5)
    codes, _, _ = quantized_codes(model[0].weight_quantizer, model[0].weight)
    assert codes.shape == (48, 80)


def test_non_finite_inputs_name_the_layer():
    model, batches = make_model(), batches_of(64)
    calibrate(model, batches)
    batches[1][3, 5] = float("inf")
    with pytest.raises(GPTQError, match=r"layer '0'.*non-finite"):
        gptq_round(model, batches)
    with pytest.raises(GPTQError, match="fc: the input second moment H has non-finite"):
        gptq_quantize(torch.randn(4, 32), torch.full((32, 32), float("nan")), ASYM4, name="fc")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layer_without_calibration_data_is_named():
    model = prepare(TwoHeads(), QuantSpec(weight=ASYM4))[0]
    with pytest.raises(GPTQError, match="layer 'unused' saw no calibration inputs"):
        gptq_round(model, batches_of(32))


def test_shared_weight_and_bad_damping_are_refused():
    model = make_model()
    model[3].weight = model[2].weight = nn.Parameter(torch.randn(32, 32))
    with pytest.raises(GPTQError, match="layers '2' and '3' share one weight"):
        gptq_round(model, batches_of(64))
    with pytest.raises(GPTQError, match="damping=0 must be > 0"):
        gptq_round(make_model(), batches_of(64), damping=0)


class MaskedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(inputs)


def test_padding_tokens_are_left_out_of_the_second_moment():
    model = prepare(MaskedEncoder(), QuantSpec(weight=QuantizerConfig(group_size=16)))[0]
    inputs, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    moments = collect_second_moments(model, gptq_layers(model), [{"inputs": inputs, "attention_mask": mask}])
    tokens = inputs[mask.bool()].double()  # (8, 16)
    assert moments["fc"].tokens == 8
    # a batch's X^T X is summed in float32 (then accumulated in float64): float32's relative rounding of 8 products
    torch.testing.assert_close(moments["fc"].hessian(), tokens.T @ tokens / 8, rtol=1e-5, atol=1e-6)


def test_weight_rounding_setting_is_checked():
    assert ScheduleConfig(weight_rounding="gptq").gptq_damping == 0.01
    with pytest.raises(ValueError, match=r"schedule.weight_rounding='gptx' is not valid; allowed: 'nearest', 'gptq'"):
        ScheduleConfig(weight_rounding="gptx")
    with pytest.raises(ValueError, match=r"schedule.gptq_damping=0.0 is not valid; allowed: \(0, 1\]"):
        ScheduleConfig(gptq_damping=0.0)
    assert ScheduleConfig(weight_rounding="gptq", gptq_act_order=True).gptq_act_order
    with pytest.raises(ValueError, match=r"schedule\.gptq_act_order=true needs schedule\.weight_rounding='gptq'"):
        ScheduleConfig(gptq_act_order=True)
