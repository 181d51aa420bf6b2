"""qat int4 CNN file -> integer (QDQ) ONNX graph, run by ONNX Runtime's integer kernels against qat.load.

Where ONNX Runtime's outputs differ from qat.load's (reference kernel, the fake-quant model bit for bit):

  - the folded conv bias is rounded to int32 at input_scale * weight_scale[c] (what QLinearConv adds to its
    accumulator), at most half of that step; the graph pass reports it in output steps;
  - QLinearConv / QLinearAdd / QLinearGlobalAveragePool requantize with a float multiplier
    (input_scale * weight_scale / output_scale) on an exact int32 sum, where the fake-quant model rounds a
    float32 sum in torch's order: values within float32 rounding of a rounding tie land on the other code.
A flipped code moves that tensor by one step of its scale, and the next layers carry (and flip more of)
it; the logits are QGemm's float output. Measured on the tiny CNN below (64 random inputs, seeds 0-7):
max |ORT - qat.load| 0.0016-0.0035 against max |logit| 0.39-0.69, i.e. 0.29-0.54 %, top-1 identical;
TINY_TOLERANCE allows 2 % of max |logit|. On EfficientNet-Lite0 (random weights and BatchNorm statistics,
32x32, 64 random inputs) 0.0058 against 0.158 (3.7 %: 16 blocks compound the flips), top-1 identical; the
test asks >= 98 % top-1 agreement, as the issue does.
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import qat
from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.models.efficientnet_lite import MBConvBlock, conv_bn
from qat.points import QuantPoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qat.export.targets import ConversionError  # noqa: E402
from qat.export.targets.cli import run_convert  # noqa: E402
from qat.export.targets.onnx import layer_codes, onnx_session, run_onnx  # noqa: E402
from qat.export.targets.onnx_integer import convert_modules, export_onnx_integer  # noqa: E402
from qat.export.targets.onnx_integer_graph import integer_op_counts, rewrite_graph  # noqa: E402

TINY_TOLERANCE = 0.02  # of max |logit| (measured <= 0.54 %, see the module docstring)
WEIGHT = QuantizerConfig(bits=4, granularity="channel", init="minmax", scale_dtype="float32")
SPEC = QuantSpec(weight=WEIGHT, activation=default_activation_config(8), fold_batchnorm=True,
                 rules=[QuantRule(type="Conv2d", quantize_activations=False),
                        QuantRule(type="Linear", quantize_activations=False)])


class TinyNet(nn.Module):
    """EfficientNetLite's layout in miniature: input point, stem conv-BN-ReLU6, one MBConv block (expand 1x1,
    depthwise 3x3, project 1x1, residual add; a point on every tensor), pooling, pooled point, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.input_point = QuantPoint()
        self.stem = conv_bn(3, 8, 3, 2)
        self.stem_out = QuantPoint(0.0, 6.0)
        self.block = MBConvBlock(8, 8, kernel=3, stride=1, expand_ratio=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pooled = QuantPoint()
        self.classifier = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_out(self.stem(self.input_point(x)))
        x = self.block(x)
        return self.classifier(self.pooled(self.pool(x).flatten(1)))


def trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters of a trained network, so that folded biases are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            for tensor, low, high in ((bn.running_mean, -0.3, 0.3), (bn.running_var, 0.5, 2.0),
                                      (bn.weight, 0.5, 1.5), (bn.bias, -0.3, 0.3)):
                tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))
    return model


def export_tiny(path, seed: int = 0, spec: QuantSpec = SPEC, edit=None, architecture=None,
                calibrated=None) -> torch.Tensor:
    """Prepare, calibrate and export a TinyNet (`edit`: called on the float model, `calibrated`: on the calibrated
    one; with `architecture`, golden inputs are stored too); returns the calibration (and trace) inputs."""
    torch.manual_seed(seed)
    model = trained_looking(TinyNet(), seed)
    if edit is not None:
        edit(model)
    model, _ = qat.prepare(model, spec)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    qat.calibrate(model, [x])
    if calibrated is not None:
        calibrated(model)
    golden = None if architecture is None else (x[:2],)
    qat.export_model(model.eval(), path, architecture=architecture, golden_inputs=golden)
    return x


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(qat file, integer ONNX file, report, trace inputs) of TinyNet, seed 0."""
    folder = tmp_path_factory.mktemp("tiny")
    x = export_tiny(folder / "tiny.safetensors")
    report = export_onnx_integer(folder / "tiny.safetensors", folder / "tiny.onnx", (x[:2],), model=TinyNet())
    return folder / "tiny.safetensors", folder / "tiny.onnx", report, x


def compare(qat_file, onnx_file, x: torch.Tensor, skeleton=None) -> tuple[float, float, float]:
    """(max |ORT - qat.load|, max |qat.load|, top-1 agreement) on `x`."""
    expected = qat.load(qat_file, kernel_backend="reference", model=skeleton)(x)
    actual = run_onnx(onnx_session(onnx_file), (x,))
    agreement = float((actual.argmax(1) == expected.argmax(1)).float().mean())
    return float((actual - expected).abs().max()), float(expected.abs().max()), agreement


@pytest.mark.parametrize("seed", [1, 2])  # seed 0 is the `tiny` fixture
def test_tiny_cnn_onnx_runtime_integer_graph_agrees_with_qat_load(tmp_path, seed: int) -> None:
    x = export_tiny(tmp_path / "tiny.safetensors", seed)
    report = export_onnx_integer(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", (x[:2],), model=TinyNet())
    probe = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(100 + seed))
    diff, largest, agreement = compare(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", probe, TinyNet())
    print(f"seed {seed}: max |ORT - qat.load| = {diff:.3g}, max |logit| = {largest:.3g}, top-1 {agreement:.3f}")
    assert diff <= TINY_TOLERANCE * largest
    assert agreement == 1.0
    assert report.integer_convs == 4 and report.float_convs == 0


def test_onnx_runtime_runs_every_layer_with_integer_kernels(tiny) -> None:
    _, onnx_file, report, _ = tiny
    ops = integer_op_counts(onnx_file)
    assert ops == report.optimized_ops
    assert ops.get("QLinearConv") == 4 and "Conv" not in ops and "FusedConv" not in ops
    assert ops.get("QLinearAdd") == 1 and ops.get("QLinearGlobalAveragePool") == 1 and ops.get("QGemm") == 1
    assert not {"Gemm", "MatMul", "Add", "GlobalAveragePool", "DequantizeLinear"} & set(ops)  # no float compute
    assert report.graph.dropped_clips == 0  # qat.load already dropped the three ReLU6 (qat.export.clamps)
    assert report.graph.int32_biases == 5 and report.graph.global_pools == 1
    assert "4 integer conv(s) and 0 float conv(s)" in str(report)


def test_clips_a_loaded_model_keeps_are_dropped_from_the_graph(tmp_path, monkeypatch) -> None:
    """A model whose clamps qat.load keeps (one fx cannot trace): the graph drops the redundant Clips itself."""
    monkeypatch.setattr(sys.modules["qat.export.load"], "elide_clamps", lambda model: [])
    x = export_tiny(tmp_path / "tiny.safetensors", 0)
    report = export_onnx_integer(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", (x[:2],), model=TinyNet())
    assert report.graph.dropped_clips == 3  # stem, expand and depthwise ReLU6 before their [0, 6] points
    assert "Clip" not in integer_op_counts(tmp_path / "tiny.onnx")


def test_int8_weight_initializers_hold_the_files_codes_and_scales(tiny) -> None:
    qat_file, onnx_file, _, _ = tiny
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(onnx_file).graph.initializer}
    loaded = qat.load(qat_file, kernel_backend="reference", model=TinyNet())
    names = ["stem.0", "block.expand.0", "block.depthwise.0", "block.project.0", "classifier"]
    for name in names:
        codes, scales, zeros = layer_codes(loaded.get_submodule(name))
        weight = initializers[f"model.{name}.weight_int8"]
        assert weight.dtype == np.int8
        expected = (codes.to(torch.int16) - zeros.to(torch.int16)) * 8  # the signed 4-bit codes, times k = 8
        assert np.array_equal(weight.reshape(weight.shape[0], -1), expected.numpy()), name
        assert np.array_equal(initializers[f"model.{name}.weight_scale"], (scales.float().reshape(-1) / 8).numpy())
    point = loaded.block.project_out.input_quantizer
    assert initializers["model.block.project_out.scale"] == point.scale.numpy()
    assert initializers["model.block.project_out.zero_point"] == point.zero_point.numpy().astype(np.uint8)


def test_the_swapped_modules_compute_what_qat_load_computes_bit_for_bit(tiny) -> None:
    qat_file, _, _, x = tiny
    loaded = qat.load(qat_file, kernel_backend="reference", model=TinyNet())
    converted = copy.deepcopy(loaded)
    layers = convert_modules(converted)
    assert len(layers) == 12  # 7 points, 4 convs, 1 Linear
    assert torch.equal(converted(x), loaded(x))


def test_signed_activation_codes_become_the_same_numbers_in_uint8(tmp_path) -> None:
    signed = QuantSpec(weight=WEIGHT, activation=QuantizerConfig(bits=8, symmetric=False, signed=True,
                                                                 granularity="tensor", quantizer="lsq_plus",
                                                                 init="minmax", scale_dtype="float32"),
                       fold_batchnorm=True, rules=SPEC.rules)
    x = export_tiny(tmp_path / "tiny.safetensors", spec=signed)
    report = export_onnx_integer(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", (x[:2],), model=TinyNet())
    loaded = qat.load(tmp_path / "tiny.safetensors", kernel_backend="reference", model=TinyNet())
    zero = loaded.block.project_out.input_quantizer.zero_point
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "tiny.onnx").graph.initializer}
    assert initializers["model.block.project_out.zero_point"] == int(zero) + 128
    diff, largest, agreement = compare(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", x, TinyNet())
    assert diff <= TINY_TOLERANCE * largest and agreement == 1.0 and report.float_convs == 0


def test_a_channel_whose_bias_overflows_int32_gets_a_larger_weight_scale(tmp_path) -> None:
    def nearly_dead_channel(model: TinyNet) -> None:  # BatchNorm gamma ~0: weights ~1e-9, bias 2
        with torch.no_grad():
            model.block.expand[1].weight[3] = 1e-9
            model.block.expand[1].bias[3] = 2.0

    x = export_tiny(tmp_path / "tiny.safetensors", edit=nearly_dead_channel)
    report = export_onnx_integer(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", (x[:2],), model=TinyNet())
    assert report.graph.rescaled_channels == {"block.expand.0": 1}
    assert report.graph.largest_rescale_error < 1e-3
    diff, largest, agreement = compare(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", x, TinyNet())
    assert diff <= TINY_TOLERANCE * largest and agreement == 1.0


def test_a_mean_outside_the_integer_pooling_range_stays_float(tmp_path) -> None:
    def fine_pooled_scale(model: nn.Module) -> None:  # s_in / (s_out * 64 pixels) far above MLAS's limit of 256
        with torch.no_grad():
            model.pooled.input_quantizer.scale.fill_(1e-7)

    x = export_tiny(tmp_path / "tiny.safetensors", calibrated=fine_pooled_scale)
    report = export_onnx_integer(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", (x[:2],), model=TinyNet())
    assert report.graph.float_pools == 1 and report.graph.global_pools == 0
    assert report.optimized_ops.get("ReduceMean") == 1 and report.integer_convs == 4 and report.float_convs == 0
    diff, largest, _ = compare(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", x, TinyNet())
    assert diff <= TINY_TOLERANCE * largest  # QLinearGlobalAveragePool would have failed at run time


def test_weights_in_groups_smaller_than_a_row_are_refused(tmp_path) -> None:
    model = nn.Sequential(QuantPoint(), nn.Conv2d(64, 8, 1))
    spec = QuantSpec(weight=QuantizerConfig(bits=4, granularity="group", group_size=32, init="minmax"),
                     activation=default_activation_config(8), rules=SPEC.rules)
    model, _ = qat.prepare(model, spec)
    x = torch.randn(2, 64, 4, 4)
    qat.calibrate(model, [x])
    qat.export_model(model, tmp_path / "g32.safetensors")
    skeleton = nn.Sequential(QuantPoint(), nn.Conv2d(64, 8, 1))
    with pytest.raises(ConversionError, match=r"layer '1': weights in groups of 32 of 64 inputs.*per output channel"):
        export_onnx_integer(tmp_path / "g32.safetensors", tmp_path / "g32.onnx", (x,), model=skeleton)


def test_a_layer_without_a_quantized_input_is_refused(tmp_path) -> None:
    spec = QuantSpec(weight=WEIGHT, activation=default_activation_config(8), fold_batchnorm=True,
                     rules=[*SPEC.rules, QuantRule(name="input_point", skip=True)])
    x = export_tiny(tmp_path / "tiny.safetensors", spec=spec)
    with pytest.raises(ConversionError, match=r"layer 'stem\.0': its input has no quantization point"):
        export_onnx_integer(tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx", (x[:2],), model=TinyNet())


def qdq_conv_graph(clip_scale: float, pad_value: float | None = None) -> onnx.ModelProto:
    """x -> Q/DQ -> [Pad(pad_value)] -> Conv(DQ(int8 W), float bias) -> Clip(0, 6) -> Q(clip_scale, 0) -> DQ -> y,
    built by hand."""
    weight = np.array([[[[3]], [[-2]]], [[[7]], [[-8]]]], dtype=np.int8)  # (2, 2, 1, 1)
    initializers = [numpy_helper.from_array(a, n) for a, n in (
        (np.float32(0.05), "xs"), (np.uint8(100), "xz"), (weight, "model.conv.weight_int8"),
        (np.array([0.02, 0.5], np.float32), "ws"), (np.zeros(2, np.int8), "wz"),
        (np.array([0.3, -0.25], np.float32), "b"), (np.float32(0.0), "lo"), (np.float32(6.0), "hi"),
        (np.float32(clip_scale), "ys"), (np.uint8(0), "yz"), (np.array([0, 0, 1, 1, 0, 0, 1, 1]), "pads"),
        (np.float32(pad_value or 0.0), "pad_value"))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["model.conv.weight_int8", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd" if pad_value is None else "xp", "wd", "b"], ["c"]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    if pad_value is not None:
        nodes.insert(3, helper.make_node("Pad", ["xd", "pads", "pad_value"], ["xp"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "h", "w"])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_the_graph_pass_quantizes_biases_and_drops_only_redundant_clips() -> None:
    model = qdq_conv_graph(6 / 255)  # codes 0..255 cover [0, 6]: the Clip changes no code
    report = rewrite_graph(model)
    onnx.checker.check_model(model, full_check=True)
    assert report.dropped_clips == 1 and "Clip" not in {n.op_type for n in model.graph.node}
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bias_scale = np.float32(0.05) * np.array([0.02, 0.5], np.float32)
    assert np.array_equal(initializers["conv.bias_scale"], bias_scale)
    assert np.array_equal(initializers["conv.bias_int32"], np.rint(np.array([0.3, -0.25]) / bias_scale))  # 300, -10
    assert "b" not in initializers and "lo" not in initializers  # the float bias and the Clip bounds are gone
    kept = qdq_conv_graph(0.1)  # codes reach 25.5 > 6: the Clip matters
    assert rewrite_graph(kept).dropped_clips == 0 and "Clip" in {n.op_type for n in kept.graph.node}


def test_a_zero_pad_between_the_quantization_point_and_the_layer_gets_the_points_qdq_again() -> None:
    model = qdq_conv_graph(6 / 255, pad_value=0.0)  # 0 is a code of the input's grid: the Pad keeps the grid
    report = rewrite_graph(model)
    onnx.checker.check_model(model, full_check=True)
    assert report.requantized == ["conv"]
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    producers = {out: n for n in model.graph.node for out in n.output}
    dq = producers[conv.input[0]]
    assert dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == ["xs", "xz"]
    q = producers[dq.input[0]]
    assert q.op_type == "QuantizeLinear" and producers[q.input[0]].op_type == "Pad"
    with pytest.raises(ConversionError, match="layer 'conv': its input has no quantization point"):
        rewrite_graph(qdq_conv_graph(6 / 255, pad_value=0.5))  # 0.5 is not a code: the padded tensor is not quantized


def test_cli_writes_the_integer_graph_and_prints_the_op_counts(tmp_path, capsys) -> None:
    export_tiny(tmp_path / "arch.safetensors", architecture={"_target_": f"{__name__}.TinyNet"})  # golden inputs
    args = argparse.Namespace(checkpoint=str(tmp_path / "arch.safetensors"), to="onnx", output=str(tmp_path / "m.onnx"),
                              integer=True, input_shape=None, input_dtype="float32", accuracy_level=0,
                              dequantize_unsupported=False, kv_cache=False, vocab=None)
    assert run_convert(args) == 0
    out = capsys.readouterr().out
    assert "4 integer conv(s) and 0 float conv(s)" in out and "QLinearConv x4" in out
    args.kv_cache = True
    assert run_convert(args) == 1 and "--integer" in capsys.readouterr().err


@pytest.mark.slow
def test_efficientnet_lite0_runs_every_conv_as_an_integer_conv(tmp_path) -> None:
    from qat.models import EfficientNetLite

    torch.manual_seed(0)
    model, _ = qat.prepare(trained_looking(EfficientNetLite(num_classes=10), seed=0), SPEC)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qat.calibrate(model, [x])
    architecture = {"_target_": "qat.models.EfficientNetLite", "num_classes": 10}
    qat.export_model(model.eval(), tmp_path / "lite0.safetensors", architecture=architecture)
    report = export_onnx_integer(tmp_path / "lite0.safetensors", tmp_path / "lite0.onnx", (x[:2],))
    assert report.integer_convs == 49 and report.float_convs == 0  # stem, 15 expands, 16 depthwise, 16 projects, head
    assert report.optimized_ops.get("QLinearAdd") == 9 and report.optimized_ops.get("QGemm") == 1
    probe = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    diff, largest, agreement = compare(tmp_path / "lite0.safetensors", tmp_path / "lite0.onnx", probe)
    print(f"EfficientNet-Lite0: max |ORT - qat.load| = {diff:.3g}, max |logit| = {largest:.3g}, top-1 {agreement}")
    assert agreement >= 0.98


def test_integer_bias_training_leaves_nothing_for_the_converter_to_round(tmp_path) -> None:
    """With QuantSpec.integer_bias the file's biases already lie on the int32 grid: the converter's rounding is
    0 (up to float32 ulps of the stored bias), and ORT comes closer to qat.load than with float biases."""
    spec = QuantSpec(**{**SPEC.__dict__, "integer_bias": True})
    diffs = {}
    for name, chosen in (("float bias", SPEC), ("integer bias", spec)):
        x = export_tiny(tmp_path / f"{name}.safetensors", 3, spec=chosen)
        report = export_onnx_integer(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.onnx", (x[:2],),
                                     model=TinyNet())
        probe = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        diffs[name] = compare(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.onnx", probe, TinyNet())[0]
        if chosen is spec:
            assert report.graph.largest_bias_rounding < 1e-4  # of an output step
    print(diffs)
    assert diffs["integer bias"] <= diffs["float bias"]
