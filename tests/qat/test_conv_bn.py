"""BatchNorm folding for QAT (qat.conv_bn) and QuantPoint markers (qat.points): hand-derived references.

Exact equality where the computation is the same sequence of float32 operations; where it is not (folding
changes the order of operations: conv(x, W) * f against conv(x, W * f)), the tolerance is a few float32
ulps of the output scale, 1e-5 absolute on values of order 1.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.config import ConfigError
from qat.conv_bn import FoldedBatchNorm2d, QuantConvBn2d, conv_bn_pairs
from qat.export.format import KEY_FOLDED, ArchitectureError
from qat.export.reader import read_header
from qat.functional import fake_quantize
from qat.points import QuantPoint

WEIGHT = QuantizerConfig(bits=4, granularity="channel", init="minmax", scale_dtype="float32")
FOLD = QuantSpec(weight=WEIGHT, fold_batchnorm=True)
POINTS = QuantSpec(weight=WEIGHT, activation=default_activation_config(8), fold_batchnorm=True,
                   rules=[QuantRule(type="Conv2d", quantize_activations=False),
                          QuantRule(type="Linear", quantize_activations=False)])


class Block(nn.Module):
    """Input point, conv-BN-ReLU6, point, depthwise conv-BN (+ residual), point, pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = QuantPoint()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.a_out = QuantPoint()
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True), nn.BatchNorm2d(8))
        self.b_out = QuantPoint()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_out(self.a(self.inp(x)))
        x = self.b_out(self.b(x) + x)
        return self.fc(x.mean((2, 3)))


def block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    model = Block()
    with torch.no_grad():
        for bn in (model.a[1], model.b[1]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def folded_reference(conv: nn.Conv2d, bn: nn.BatchNorm2d, quantizer, x: torch.Tensor) -> torch.Tensor:
    """conv(x, q(W * g / s), beta + (b - mean) * g / s) written out by hand."""
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * factor.reshape(-1, 1, 1, 1)
    scale, zero = quantizer.qparams()
    codes_weight = fake_quantize(weight, scale.reshape(-1, 1, 1, 1), zero.reshape(-1, 1, 1, 1), -8, 7)
    bias = bn.bias + ((conv.bias if conv.bias is not None else 0) - bn.running_mean) * factor
    return F.conv2d(x, codes_weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def test_pairs_are_sequential_neighbours_with_matching_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(5)))
    assert conv_bn_pairs(model) == {"0": "1"}  # 2 -> ReLU -> BN is not adjacent; 5.0 has the wrong count
    assert conv_bn_pairs(block()) == {"a.0": "a.1", "b.0": "b.1"}


def test_fake_quant_off_is_the_float_model_in_training_and_eval():
    float_model, model = block(), block()
    model, report = qat.prepare(model, FOLD)
    assert "a.1 folded in" in report["a.0"].reason and isinstance(model.a[0], QuantConvBn2d)
    assert isinstance(model.a[1], FoldedBatchNorm2d) and model.a[0].bn is model.a[1]
    assert set(model.state_dict()) >= set(float_model.state_dict())  # every float name kept
    qat.set_fake_quant(model, weights=False)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(model.train()(x), float_model.train()(x))  # batch statistics, running ones updated
    assert torch.equal(model.a[1].running_var, float_model.a[1].running_var)
    assert torch.equal(model.eval()(x), float_model.eval()(x))


def test_eval_mode_computes_the_folded_quantized_conv():
    model, _ = qat.prepare(block(), FOLD)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    conv, bn = model.a[0], model.a[1]
    expected = folded_reference(conv, bn, conv.weight_quantizer, x)
    assert torch.allclose(conv(x), expected, atol=1e-5, rtol=0)
    assert model.a[1](expected) is expected  # the BN passes the folded output through


def test_weight_range_is_initialized_on_the_folded_weight():
    model, _ = qat.prepare(block(), FOLD)
    conv, bn = model.a[0], model.a[1]
    folded = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    scale, _ = conv.weight_quantizer.qparams()
    # symmetric min-max per output channel: max |W'| / 7
    assert torch.allclose(scale.flatten(), folded.detach().abs().flatten(1).amax(1) / 7, rtol=1e-6, atol=0)


def test_training_mode_normalizes_the_quantized_conv_with_batch_statistics():
    model, _ = qat.prepare(block(), FOLD)
    conv, bn = model.b[0], model.b[1]
    reference_bn = copy.deepcopy(bn.to_batchnorm()).train()
    model.train()
    x = torch.randn(4, 8, 6, 6)
    y = conv(x)
    factor = bn.weight / torch.sqrt(reference_bn.running_var + bn.eps)
    scale, zero = conv.weight_quantizer.qparams()
    weight = fake_quantize(conv.weight * factor.reshape(-1, 1, 1, 1), scale.reshape(-1, 1, 1, 1),
                           zero.reshape(-1, 1, 1, 1), -8, 7)
    # the conv with the quantized folded weight, scaled back by 1 / factor, plus the conv bias: then a
    # BatchNorm with batch statistics (which also updates the running ones)
    pre = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups) / factor.reshape(1, -1, 1, 1)
    expected = reference_bn(pre + conv.bias.reshape(1, -1, 1, 1))
    assert torch.allclose(y, expected, atol=1e-5, rtol=0)
    assert torch.allclose(bn.running_mean, reference_bn.running_mean, atol=1e-6, rtol=0)
    assert torch.allclose(bn.running_var, reference_bn.running_var, atol=1e-6, rtol=0)
    assert int(bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 1
    y.sum().backward()  # gradients reach the raw weight, gamma, beta and the scale
    assert all(p.grad is not None for p in (conv.weight, bn.weight, bn.bias, conv.weight_quantizer.scale))


def prepared_points(seed: int = 0) -> nn.Module:
    model, _ = qat.prepare(block(seed), POINTS)
    x = torch.randn(8, 3, 6, 6)
    qat.calibrate(model, [x])
    return model.eval()


def test_export_stores_the_folded_conv_and_no_batchnorm_and_loads_bitwise(tmp_path):
    path = tmp_path / "m.safetensors"
    for seed in range(3):
        model = prepared_points(seed)
        qat.export_model(model, path)
        header = read_header(str(path))
        assert json.loads(header.metadata[KEY_FOLDED]) == {"a.1": "a.0", "b.1": "b.0"}
        assert not any(name.startswith(("a.1.", "b.1.")) for name in header.tensors)
        assert "a.0.bias" in header.tensors and "inp.input_quantizer.scale" in header.tensors
        loaded = qat.load(path, model=Block(), kernel_backend="reference")
        assert isinstance(loaded.a[1], nn.Identity) and isinstance(loaded.b[1], nn.Identity)
        probe = torch.randn(5, 3, 7, 7)
        with torch.no_grad():
            assert torch.equal(loaded(probe), model(probe))


def test_unprepare_restores_batchnorm_or_folds_it_away():
    original = block()
    model = prepared_points()
    restored = qat.unprepare(copy.deepcopy(model))
    assert type(restored.a[1]) is nn.BatchNorm2d and type(restored.a[0]) is nn.Conv2d
    assert type(restored.inp) is QuantPoint
    for key, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    baked = qat.unprepare(copy.deepcopy(model), fold=True)
    assert isinstance(baked.a[1], nn.Identity) and baked.a[0].bias is not None
    qat.set_fake_quant(model, activations=False)  # the baked float model has no activation quantizers
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(baked.eval()(x), model(x), atol=1e-5, rtol=0)


def test_a_file_folding_a_layer_the_architecture_lacks_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    qat.export_model(prepared_points(), path)

    class Other(Block):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU6(), nn.ReLU6())

    with pytest.raises(ArchitectureError, match="folded_batchnorm"):
        qat.load(path, model=Other())


def test_quant_point_settings():
    with pytest.raises(ConfigError, match="per tensor"):
        qat.prepare(block(), QuantSpec(weight=WEIGHT, activation=QuantizerConfig(bits=8, granularity="channel")))
    model, report = qat.prepare(block(), QuantSpec(weight=WEIGHT))
    assert report["inp"].action == "skipped" and type(model.inp) is QuantPoint
    spec = QuantSpec(weight=WEIGHT, rules=[QuantRule(type="QuantPoint", activation_bits=6)])
    model, report = qat.prepare(block(), spec)
    assert model.a_out.input_quantizer.config.bits == 6 and report["a_out"].action == "quantized"
    assert model.a[0].input_quantizer is None  # the rule matches QuantPoints only: convs stay weight-only


def test_a_fixed_range_point_is_exactly_the_relu6_clamp_and_ignores_calibration():
    model = nn.Sequential(nn.ReLU6(), QuantPoint(0.0, 6.0))
    model, _ = qat.prepare(model, QuantSpec(weight=None, activation=default_activation_config(8)))
    quantizer = model[1].input_quantizer
    scale, zero = quantizer.qparams()
    assert torch.equal(scale, torch.tensor(6 / 255)) and quantizer.frozen and not quantizer.scale.requires_grad
    x = torch.linspace(-3, 9, 1001)
    qat.calibrate(model, [x * 0.1])  # a narrower range observed: not taken
    assert torch.equal(quantizer.qparams()[0], scale)
    codes = torch.clamp(torch.round(x / scale) + zero, zero, zero + 255)  # 0..6 on codes 0..255, no ReLU6
    assert torch.equal(model(x), (codes - zero) * scale)
    assert torch.equal(model(x), nn.Sequential(nn.Identity(), model[1])(x))  # the ReLU6 changes nothing
    with pytest.raises(ValueError, match="both"):
        QuantPoint(0.0)


def test_loaded_convs_keep_their_dequantized_weight_under_dequant_cached(tmp_path):
    path = tmp_path / "m.safetensors"
    model = prepared_points()
    qat.export_model(model, path)
    cached = qat.load(path, model=Block(), kernel_backend="dequant_cached")
    per_call = qat.load(path, model=Block(), kernel_backend="dequant")
    probe = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(cached(probe), per_call(probe)) and torch.equal(cached(probe), model(probe))
    assert cached.a[0]._cached_weight is cached.a[0].conv_weight(torch.float32)  # computed once, kept
    assert per_call.a[0]._cached_weight is None


def test_the_compiled_point_kernel_is_bit_identical_to_the_torch_ops():
    from qat.kernels.native import native_module

    from qat.export.runtime import InputQuantizer
    from qat.export.spec import InputSpec

    if native_module() is None:
        pytest.skip("the compiled CPU kernels did not build here (native_module() is None)")
    spec = InputSpec(bits=8, signed=True, symmetric=False, granularity="tensor", axis=-1, channels=0,
                     scale_dtype="float32", quantizer="lsq_plus")
    quantizer = InputQuantizer(spec, device="cpu")
    quantizer.scale.fill_(0.0371)
    quantizer.zero_point.fill_(-17)
    x = torch.randn(4, 8, 33, 33) * 6
    x.view(-1)[:500] = (torch.arange(-250, 250) + 0.5) * quantizer.scale  # exact ties: half to even
    x.view(-1)[500:503] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with torch.no_grad():
        fused = quantizer(x)
    reference = fake_quantize(x, quantizer.scale.float(), quantizer.zero_point.float(), -128, 127)
    assert torch.equal(fused.nan_to_num(9.0), reference.nan_to_num(9.0)) and fused.view(-1)[500].isnan()
    leaf = x.clone().requires_grad_()
    quantizer(leaf).sum().backward()  # with autograd on: the torch ops, not the kernel (it has no backward)
    assert leaf.grad is not None


def test_weight_statistics_of_a_folded_conv_are_of_the_folded_weight():
    from qat.eval.layers import weight_sqnr
    from qat.lightning.telemetry import weight_stats

    model, _ = qat.prepare(block(), FOLD)
    conv, bn = model.a[0], model.a[1]
    folded = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    row = next(r for r in weight_sqnr(model) if r["layer"] == "a.0")
    assert row["weight_sqnr_db"] == weight_stats(folded, conv.weight_quantizer)["sqnr_db"]
    assert row["clipped"] == 0.0  # min-max ranges of the folded weight clip nothing


INTEGER_BIAS = QuantSpec(weight=WEIGHT, activation=default_activation_config(8), fold_batchnorm=True, integer_bias=True,
                         rules=[QuantRule(type="Conv2d", quantize_activations=False),
                                QuantRule(type="Linear", quantize_activations=False)])


def test_integer_bias_is_on_the_input_times_weight_scale_grid_and_exported_so(tmp_path):
    model, _ = qat.prepare(block(), INTEGER_BIAS)
    x = torch.randn(8, 3, 6, 6)
    qat.calibrate(model, [x])
    model.eval()
    with torch.no_grad():
        y = model(x)
    conv, point = model.b[0], model.a_out
    grid = point.input_quantizer.qparams()[0] * conv.weight_quantizer.qparams()[0].reshape(-1) / 8  # k = 8
    bias = conv.export_bias()
    assert conv.input_point is point and not torch.equal(bias, conv.bn.folded_bias(conv.bias))
    assert torch.allclose(bias / grid, torch.round(bias / grid), atol=1e-3, rtol=0)  # integers
    fc_bias = model.fc.grid_bias(model.fc.bias)
    assert torch.equal(fc_bias, model.fc.bias)  # its input is a mean, not a point's output: float bias
    path = tmp_path / "m.safetensors"
    qat.export_model(model, path)
    loaded = qat.load(path, model=Block(), kernel_backend="reference")
    with torch.no_grad():
        assert torch.equal(loaded(x), y)  # the file holds the rounded biases the model trained with
    assert torch.equal(loaded.fc.bias, fc_bias)


def test_integer_bias_export_without_a_forward_runs_the_golden_inputs_or_refuses(tmp_path):
    from qat.export import ExportError

    model, _ = qat.prepare(block(), INTEGER_BIAS)
    qat.calibrate(model, [torch.randn(8, 3, 6, 6)])
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        module.__dict__.pop("input_point", None)
    with pytest.raises(ExportError, match="integer grid"):
        qat.export_model(fresh, tmp_path / "m.safetensors")
    qat.export_model(fresh, tmp_path / "m.safetensors", golden_inputs=(torch.randn(2, 3, 6, 6),))
    assert fresh.b[0].input_point is fresh.a_out
