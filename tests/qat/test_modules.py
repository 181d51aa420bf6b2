"""QuantLinear / QuantConv2d / QuantEmbedding: from_float, forward, to_float (and fold)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.config import LayerConfig, QuantizerConfig, default_activation_config
from qat.functional import NonFiniteError, fake_quantize
from qat.modules import QuantConv2d, QuantEmbedding, QuantLinear


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


W4 = QuantizerConfig(bits=4, group_size=32)
A8 = default_activation_config(8)


def weight_reference(w: torch.Tensor, quantizer) -> torch.Tensor:
    """Fake-quantized weight from the quantizer's applied qparams, groups of 32 along inputs."""
    scale, zero = quantizer.qparams()
    grouped = w.detach().reshape(w.shape[0], -1, 32)
    return fake_quantize(grouped, scale[..., None], zero[..., None], -8, 7).reshape(w.shape)


def test_linear_shares_parameters_and_quantizes_weight_and_input():
    float_layer = nn.Linear(64, 16)
    layer = QuantLinear.from_float(float_layer, LayerConfig(weight=W4, activation=A8))
    assert layer.weight is float_layer.weight and layer.bias is float_layer.bias
    x = torch.randn(5, 64)
    y = layer(x)  # the first batch initializes the input quantizer
    s, z = layer.input_quantizer.qparams()
    x_hat = fake_quantize(x, s, z, 0, 255)
    expected = F.linear(x_hat, weight_reference(layer.weight, layer.weight_quantizer), layer.bias)
    assert torch.equal(y, expected)
    assert not torch.equal(y, float_layer(x))


def test_linear_gradients_reach_weight_bias_and_scales():
    layer = QuantLinear.from_float(nn.Linear(64, 8), LayerConfig(weight=W4, activation=A8))
    layer(torch.randn(4, 64))  # initializes the input range from this batch
    layer(torch.randn(4, 64) * 3).square().sum().backward()  # a wider batch: some inputs clip
    for param in (
        layer.weight,
        layer.bias,
        layer.weight_quantizer.scale,
        layer.input_quantizer.scale,
        layer.input_quantizer.zero_point,
    ):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_from_float_refuses_a_group_size_that_does_not_divide():
    conv = nn.Conv2d(8, 6, kernel_size=3)  # inputs per output channel: 8 * 3 * 3 = 72
    with pytest.raises(ValueError, match="group_size=32 does not divide input dimension 72"):
        QuantConv2d.from_float(conv, LayerConfig(weight=W4, activation=None))


def test_conv2d_forward_and_round_trip():
    float_conv = nn.Conv2d(8, 6, kernel_size=2, stride=2, padding=1, groups=2, bias=True)  # inputs 4 * 2 * 2 = 16
    cfg = LayerConfig(weight=QuantizerConfig(bits=4, group_size=16), activation=A8)
    conv = QuantConv2d.from_float(float_conv, cfg)
    assert conv.weight_quantizer.scale.shape == (6, 1)
    assert conv.input_quantizer.scale.shape == ()
    x = torch.randn(2, 8, 5, 5)
    y = conv(x)
    x_hat = fake_quantize(x, *conv.input_quantizer.qparams(), 0, 255)
    scale, zero = conv.weight_quantizer.qparams()
    w_hat = fake_quantize(conv.weight.detach().reshape(6, 1, 16), scale[..., None], zero[..., None], -8, 7)
    expected = F.conv2d(x_hat, w_hat.reshape(conv.weight.shape), conv.bias, stride=2, padding=1, groups=2)
    assert torch.equal(y, expected)
    back = conv.to_float()
    assert type(back) is nn.Conv2d and back.weight is float_conv.weight
    assert (back.stride, back.padding, back.groups) == ((2, 2), (1, 1), 2)
    assert torch.equal(back(x), float_conv(x))


def test_conv2d_per_channel_activations_along_axis_1():
    act = QuantizerConfig(bits=8, symmetric=False, quantizer="lsq_plus", granularity="channel", init="minmax")
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 1), LayerConfig(weight=None, activation=act))
    x = torch.randn(2, 3, 4, 4) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1)
    conv(x)
    scale, _ = conv.input_quantizer.qparams()
    assert scale.shape == (3,) and scale[1] > 50 * scale[2]  # one scale per input channel


def test_embedding_quantizes_the_table_not_the_ids():
    float_emb = nn.Embedding(10, 64, padding_idx=0)
    emb = QuantEmbedding.from_float(float_emb, LayerConfig(weight=W4, activation=A8))
    assert emb.input_quantizer is None and emb.padding_idx == 0
    ids = torch.tensor([[0, 3, 9], [1, 1, 2]])
    table = weight_reference(emb.weight, emb.weight_quantizer)
    assert torch.equal(emb(ids), table[ids])
    assert (emb(ids)[0, 0] == 0).all()  # the zero padding row stays exactly zero
    back = emb.to_float()
    assert type(back) is nn.Embedding and back.padding_idx == 0 and torch.equal(back(ids), float_emb(ids))


@pytest.mark.parametrize("training", [True, False])
def test_to_float_round_trip_and_fold(training):
    float_layer = nn.Linear(64, 8).train(training)
    layer = QuantLinear.from_float(float_layer, LayerConfig(weight=W4, activation=None))
    assert layer.training is training
    x = torch.randn(3, 64)
    plain = layer.to_float()
    assert type(plain) is nn.Linear and plain.weight is float_layer.weight and plain.bias is float_layer.bias
    assert plain.training is training and torch.equal(plain(x), float_layer(x))
    folded = layer.to_float(fold=True)
    assert torch.equal(folded.weight, weight_reference(layer.weight, layer.weight_quantizer))
    assert torch.equal(folded(x), layer(x)) and folded.weight is not float_layer.weight


def test_init_weight_qparams_follows_the_current_weight():
    layer = QuantLinear.from_float(nn.Linear(32, 4), LayerConfig(weight=W4, activation=None))
    before = layer.weight_quantizer.scale.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(4)
    layer.init_weight_qparams()
    torch.testing.assert_close(layer.weight_quantizer.scale.detach(), before * 4, rtol=1e-6, atol=0)


def test_non_finite_weight_is_refused():
    float_layer = nn.Linear(32, 4)
    with torch.no_grad():
        float_layer.weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="weight has 1 non-finite"):
        QuantLinear.from_float(float_layer, LayerConfig(weight=W4, activation=None))
