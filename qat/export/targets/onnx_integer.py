"""`qat export FILE --to onnx --integer`: a QDQ ONNX graph that ONNX Runtime runs with integer kernels.

The qat file is loaded with `qat.load` (reference kernel) and each quantized module is swapped for one
that exports as the ONNX QDQ form of exactly its numbers:

    QuantPoint (8-bit, per tensor)  QuantizeLinear -> DequantizeLinear, uint8, the point's scale and zero
                                    point (signed codes are shifted: code + 128, zero + 128, the same reals)
    Conv2d / Linear, per channel    an int8 initializer holding the file's codes minus their zero point, times
                                    k = qat.functional.int8_weight_multiplier (8 for symmetric 4-bit codes:
                                    |code * k| <= 64) -> DequantizeLinear(axis 0) with the file's scales / k
                                    (the same reals; the int32 bias grid input scale x weight scale / k is k
                                    times finer)
                                    -> Conv / Gemm (input quantization of the layer itself: a QDQ in front)

Why uint8 activations and int8 weights: it is the pair ONNX Runtime's x86 kernels (MLAS) run fastest
(u8s8). Without AVX-512 VNNI / AVX-VNNI, MLAS multiplies u8 x s8 pairs with vpmaddubsw, whose 16-bit sums of
two products saturate for 8-bit weights (255 * 127 * 2 > 32767: the reason for ORT's `reduce_range`);
codes times k stay within +-64 (255 * 64 * 2 = 32640 <= 32767), so these graphs are exact on AVX2 machines too.

The graph is traced by `torch.onnx.export(dynamo=True)`; `onnx_integer_graph` then quantizes the biases
(int32 at input_scale * weight_scale[c], the one deviation from the fake-quant model: see there), drops
each ReLU6 (Clip) the QuantizeLinear after it makes redundant, and checks that every quantized layer
reads a quantized tensor. Every other op (residual Add, pooling, Flatten) stays an ONNX op between a
DequantizeLinear and a QuantizeLinear, so ONNX Runtime's QDQ transformers fuse the groups into
QLinearConv, QLinearAdd, QLinearGlobalAveragePool and QGemm (float logits); `integer_op_counts` counts
the ops of the graph ONNX Runtime optimizes it into, which the report gives.

Refused with `ConversionError` naming the layer: weights in groups smaller than a row (the integer
kernels take one scale per output channel), weights wider than 8 bits or whose codes minus zero leave
int8, activation quantizers that are not 8-bit per tensor, Embedding layers, Linear layers on inputs of
more than 2 dimensions, and (in the graph pass) a quantized layer whose input no quantization point
precedes.

Example:
    >>> report = export_onnx_integer("lite0.safetensors", "lite0-int8.onnx")
    >>> print(report)  # ... ONNX Runtime (CPU, ORT_ENABLE_ALL) runs 49 integer conv(s) and 0 float conv(s); ...
    >>> report.integer_convs, report.float_convs
    (49, 0)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.export import golden
from qat.export.load import load
from qat.export.manifest import read_golden
from qat.export.runtime import InputQuantizer, PackedConv2d, PackedLinear, _PackedWeight
from qat.export.targets.errors import ConversionError, refuse
from qat.export.targets.onnx import METADATA_SOURCE, FirstOutput, _dynamic_shapes, _trace_inputs, layer_codes
from qat.export.targets.onnx_integer_graph import GraphReport, integer_op_counts, rewrite_graph
from qat.functional import int8_weight_multiplier
from qat.points import QuantPoint

TARGET = "onnx --integer"
DEFAULT_OPSET = 21
MIN_OPSET = 18  # torch.onnx.export(dynamo=True) writes 18 and newer
QDQ_POINT = "QuantizeLinear -> DequantizeLinear"
UINT8_SHIFT = 128  # signed 8-bit codes + 128 = the same reals as uint8 codes (zero point + 128)


# ---- ops that export as QDQ nodes ---------------------------------------------------------------
@torch.library.custom_op("qat_onnx_integer::qdq", mutates_args=())
def qdq(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """(clamp(round(x / scale) + zero, 0, 255) - zero) * scale (float32; zero_point uint8): exports as
    QuantizeLinear -> DequantizeLinear."""
    zero = zero_point.float()
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


@qdq.register_fake
def _qdq_shape(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty_like(x)


def dequantize_int8(codes: Tensor, scale: Tensor) -> Tensor:
    """codes (int8, N x ...) * scale (N,) broadcast along axis 0, in float32."""
    return codes.float() * scale.reshape(-1, *[1] * (codes.dim() - 1))


@torch.library.custom_op("qat_onnx_integer::conv", mutates_args=())
def qdq_conv(x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], stride: list[int],
             padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """conv2d(x, codes * scale, bias) (zero_point: int8 zeros): exports as DequantizeLinear(codes, scale,
    zero_point, axis=0) -> Conv."""
    return F.conv2d(x, dequantize_int8(codes, scale), bias, stride, padding, dilation, groups)


@qdq_conv.register_fake
def _qdq_conv_shape(x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor],
                    stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    weight = torch.empty(codes.shape, dtype=x.dtype, device=x.device)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


@torch.library.custom_op("qat_onnx_integer::linear", mutates_args=())
def qdq_linear(x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ (codes * scale).T + bias for 2-D x (zero_point: int8 zeros): exports as DequantizeLinear(codes, scale,
    zero_point, axis=0) -> Gemm(transB=1)."""
    return F.linear(x, dequantize_int8(codes, scale), bias)


@qdq_linear.register_fake
def _qdq_linear_shape(x: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))


def translations(opset: int) -> dict:
    """The `custom_translation_table` for torch.onnx.export: our ops -> Q / DQ / Conv / Gemm nodes."""
    import onnxscript

    op = onnxscript.values.Opset("", opset)

    def to_qdq(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def to_conv(x, codes, scale, zero_point, bias, stride, padding, dilation, groups):
        weight = op.DequantizeLinear(codes, scale, zero_point, axis=0)
        pads = [*padding, *padding]
        if bias is None:
            return op.Conv(x, weight, strides=stride, pads=pads, dilations=dilation, group=groups)
        return op.Conv(x, weight, bias, strides=stride, pads=pads, dilations=dilation, group=groups)

    def to_gemm(x, codes, scale, zero_point, bias):
        weight = op.DequantizeLinear(codes, scale, zero_point, axis=0)
        return op.Gemm(x, weight, transB=1) if bias is None else op.Gemm(x, weight, bias, transB=1)

    return {torch.ops.qat_onnx_integer.qdq.default: to_qdq, torch.ops.qat_onnx_integer.conv.default: to_conv,
            torch.ops.qat_onnx_integer.linear.default: to_gemm}


# ---- the modules swapped in ------------------------------------------------------------------------
class QDQPoint(nn.Module):
    """An 8-bit per-tensor activation quantizer as uint8 QuantizeLinear -> DequantizeLinear."""

    def __init__(self, quantizer: InputQuantizer, name: str) -> None:
        super().__init__()
        spec = quantizer.spec
        if spec.bits != 8 or spec.granularity != "tensor":
            raise refuse(TARGET, name, f"{spec.bits}-bit {spec.granularity} activation quantization; the integer "
                         "kernels take 8-bit per-tensor activations")
        shift = UINT8_SHIFT if spec.signed else 0
        self.register_buffer("scale", quantizer.scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", (quantizer.zero_point.reshape(()) + shift).to(torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        return qdq(x, self.scale, self.zero_point)


def int8_weight(packed: _PackedWeight, name: str) -> tuple[Tensor, Tensor]:
    """int8 codes minus zero point (the float weight's shape) and float32 scales (N,) of a per-channel layer."""
    w = packed.weight_spec
    if w.bits > 8:
        raise refuse(TARGET, name, f"{w.bits}-bit weights; int8 initializers hold at most 8 bits")
    if w.group_size != w.columns:
        raise refuse(TARGET, name, f"weights in groups of {w.group_size} of {w.columns} inputs; the integer "
                     "kernels (QLinearConv, QGemm) take one scale per output channel (per-channel quantization)")
    codes, scales, zeros = layer_codes(packed)
    signed = codes.to(torch.int16) - zeros.to(torch.int16)  # (N, K) - (N, 1)
    if signed.min() < -128 or signed.max() > 127:
        raise refuse(TARGET, name, f"{w.bits}-bit codes minus their zero points span [{int(signed.min())}, "
                     f"{int(signed.max())}], outside int8")
    multiplier = int8_weight_multiplier(w.bits, w.symmetric)  # codes * k, scale / k: the same reals, an int32
    signed = signed * multiplier  # bias grid k times finer (the one QAT with integer_bias trains on)
    if signed.min() < -128 or signed.max() > 127:
        raise refuse(TARGET, name, f"codes times {multiplier} span [{int(signed.min())}, {int(signed.max())}]")
    return signed.to(torch.int8).reshape(w.shape), scales.float().reshape(-1) / multiplier


def register_int8_weight(module: nn.Module, packed: _PackedWeight, name: str) -> None:
    """The buffers of a QDQ layer (int8 codes, per-channel scales, int8 zeros, float bias) and its input point."""
    codes, scales = int8_weight(packed, name)
    module.register_buffer("weight_int8", codes)
    module.register_buffer("weight_scale", scales)
    module.register_buffer("weight_zero", torch.zeros(scales.shape, dtype=torch.int8))  # QGemm needs it given
    module.register_buffer("bias", None if packed.bias is None else packed.bias.detach().float())
    module.input_point = None if packed.input_quantizer is None else QDQPoint(packed.input_quantizer, name)


class QDQConv2d(nn.Module):
    """A packed Conv2d as DequantizeLinear(int8 codes, per-channel scales) -> Conv (float bias, quantized by
    the graph pass)."""

    def __init__(self, packed: PackedConv2d, name: str) -> None:
        super().__init__()
        if packed.padding_mode != "zeros":
            raise refuse(TARGET, name, f"padding_mode={packed.padding_mode!r}; ONNX Conv pads with zeros")
        register_int8_weight(self, packed, name)
        self.stride, self.dilation, self.groups = list(packed.stride), list(packed.dilation), packed.groups
        self.padding = conv_padding(packed, name)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_point is not None:
            x = self.input_point(x)
        return qdq_conv(x, self.weight_int8, self.weight_scale, self.weight_zero, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def conv_padding(packed: PackedConv2d, name: str) -> list[int]:
    """Symmetric (ph, pw) of a conv: its padding, 'valid' -> 0, 'same' -> dilation * (k - 1) / 2 (stride 1)."""
    if packed.padding == "valid":
        return [0, 0]
    if packed.padding == "same":
        totals = [d * (k - 1) for d, k in zip(packed.dilation, packed.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise refuse(TARGET, name, "padding='same' with an even kernel pads one side more (not written)")
        return [t // 2 for t in totals]
    return list(packed.padding)


class QDQLinear(nn.Module):
    """A packed Linear as DequantizeLinear(int8 codes, per-channel scales) -> Gemm(transB=1)."""

    def __init__(self, packed: PackedLinear, name: str) -> None:
        super().__init__()
        register_int8_weight(self, packed, name)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise refuse(TARGET, self.name, f"a {x.dim()}-D input; the integer graph writes Linear layers as "
                         "Gemm, which takes (batch, features)")
        if self.input_point is not None:
            x = self.input_point(x)
        return qdq_linear(x, self.weight_int8, self.weight_scale, self.weight_zero, self.bias)


def convert_modules(model: nn.Module) -> dict[str, str]:
    """Swap the QDQ modules in for the quantization points and packed layers of a loaded model (in place);
    returns {name: what it became}."""
    swapped: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantPoint) and getattr(module, "input_quantizer", None) is not None:
            replacement, kind = QDQPoint(module.input_quantizer, name), QDQ_POINT
        elif isinstance(module, PackedConv2d):
            replacement, kind = QDQConv2d(module, name), "DequantizeLinear(int8) -> Conv"
        elif isinstance(module, PackedLinear):
            replacement, kind = QDQLinear(module, name), "DequantizeLinear(int8) -> Gemm"
        elif isinstance(module, _PackedWeight):
            raise refuse(TARGET, name, f"{module.spec.type} layers have no integer ONNX form here")
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        swapped[name] = kind
    return swapped


# ---- the export ------------------------------------------------------------------------------------
INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger")  # ONNX Runtime's integer convolutions (any domain)
FLOAT_CONV_OPS = ("Conv", "FusedConv")  # a float convolution (ONNX, NCHWc or com.microsoft Conv + activation)
METADATA_INTEGER = "qat.integer"


@dataclass
class IntegerOnnxReport:
    """What `export_onnx_integer` wrote (`layers`: module -> its QDQ form; `graph`: the graph pass) and the op
    types of the graph ONNX Runtime runs (`optimized_ops`, see `integer_op_counts`)."""

    path: str
    layers: dict[str, str] = field(default_factory=dict)
    graph: GraphReport = field(default_factory=GraphReport)
    optimized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def integer_convs(self) -> int:
        return sum(self.optimized_ops.get(op, 0) for op in INTEGER_CONV_OPS)

    @property
    def float_convs(self) -> int:
        return sum(self.optimized_ops.get(op, 0) for op in FLOAT_CONV_OPS)

    def __str__(self) -> str:
        points = sum(kind == QDQ_POINT for kind in self.layers.values())
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.optimized_ops.items()))
        return (f"{self.path}: {points} quantization point(s) as QuantizeLinear -> DequantizeLinear; {self.graph}\n"
                f"ONNX Runtime (CPU, ORT_ENABLE_ALL) runs {self.integer_convs} integer conv(s) and "
                f"{self.float_convs} float conv(s); ops: {ops}")


def export_onnx_integer(
    path: str | os.PathLike,
    output: str | os.PathLike,
    example_inputs: Optional[Sequence[Tensor]] = None,
    opset: int = DEFAULT_OPSET,
    *,
    model: Optional[nn.Module] = None,
) -> IntegerOnnxReport:
    """Write the qat file `path` as an integer (QDQ) ONNX model at `output`; returns an `IntegerOnnxReport`
    with the op counts of the graph ONNX Runtime optimizes it into.

    `example_inputs` (the model's positional inputs) fix the traced shapes, the batch dimension staying
    dynamic; without them the golden inputs stored in the file are used. `opset`: the ONNX opset (18 or
    newer). `model`: a float skeleton of the architecture, for a file that records none (as `qat.load`).
    Raises `ConversionError` naming the layer for what the integer graph cannot hold (module docstring).
    The golden data is not copied: the integer graph differs from it by design (bias rounding,
    requantization), by more than `qat verify`'s float tolerance.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset}; the exporter writes opset {MIN_OPSET} or newer")
    if example_inputs is None:
        stored = read_golden(path)
        if stored is None:
            raise ConversionError(f"{path}: no golden inputs in the file to trace the graph with; pass "
                                  "example_inputs (qat export --to onnx --integer --input-shape ...)")
        example_inputs = stored.inputs
    model = load(path, kernel_backend="reference", model=model)
    report = IntegerOnnxReport(path=os.fspath(output), layers=convert_modules(model))
    inputs = _trace_inputs(example_inputs)
    with torch.no_grad():
        FirstOutput(model).eval()(*inputs)  # refusals raised while running (a Linear on a 3-D input) come out here
    program = torch.onnx.export(
        FirstOutput(model).eval(), inputs, dynamo=True, custom_translation_table=translations(opset),
        opset_version=opset, optimize=True, input_names=[f"input_{i}" for i in range(len(inputs))],
        output_names=["output"], dynamic_shapes=(_dynamic_shapes(inputs),), verbose=False,
    )
    proto = program.model_proto
    report.graph = rewrite_graph(proto)
    proto.metadata_props.add(key=METADATA_SOURCE, value=golden.file_sha256(path))
    proto.metadata_props.add(key=METADATA_INTEGER, value=json.dumps(report.layers, sort_keys=True))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, os.fspath(output))
    report.optimized_ops = integer_op_counts(output)
    return report
