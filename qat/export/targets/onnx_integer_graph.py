"""The ONNX-level pass of `qat export --to onnx --integer` (onnx_integer.py), and counting ORT's integer ops.

`rewrite_graph` takes the traced QDQ graph and, in place:

  - checks that every Conv / Gemm with an int8 weight reads a DequantizeLinear: directly, or through ops that
    only move values (Reshape, Flatten, Squeeze, Unsqueeze, Identity, zero-constant Pad), after which a copy
    of that QuantizeLinear -> DequantizeLinear is inserted (exact: those ops output values of the same grid,
    and 0 is a code). Otherwise the layer's input has no quantization point: `ConversionError` naming it.
  - quantizes each such layer's float bias to int32 at scale input_scale * weight_scale[c] (DequantizeLinear,
    axis 0): what QLinearConv / QGemm add to their int32 accumulators. This rounding, at most half a step of
    input_scale * weight_scale[c], is where the graph's numbers differ from the fake-quant model; the report
    gives the largest in steps of the output (0.07-0.2 on the tests' models; up to ~1.5 in EfficientNet-Lite0's
    ImageNet weights, whose depthwise weight steps are coarser than the output's). A file trained with
    `QuantSpec(integer_bias=True)` has its biases on that grid already: the rounding is 0 (float32 ulps) and
    ORT's outputs equal `qat.load`'s up to float32 summation order (tested). A channel whose bias does
    not fit int32 at that scale (a nearly dead channel: weights ~1e-8 after a BatchNorm with gamma ~0, bias
    of order 1; lite0's ImageNet weights have 8) gets a larger weight scale and its codes rounded to it, so
    its int8 initializer row is no longer the file's codes (`GraphReport.rescaled_channels`; the output moves
    by a bound reported in output steps, ~1e-4; over half a step is refused).
  - drops a Clip (a ReLU6) or Relu whose only consumer is a QuantizeLinear that maps its lower bound to the
    lowest code and its upper bound to the highest: then Q(clip(x)) == Q(x) for every x (Q is monotone),
    so the Clip is exactly redundant (ORT's ClipQuantFusion removes the same ones).
  - writes ReduceMean over the two spatial axes of a 4-D tensor (keepdims) as GlobalAveragePool, and moves
    a QuantizeLinear from after a Reshape / Flatten to before it (a per-tensor Q commutes with moving
    values), so that pooling sits between a DequantizeLinear and a QuantizeLinear and ORT fuses it into
    QLinearGlobalAveragePool, unless its scales are outside that kernel's range (it fails at run time):
    then the mean stays float (`GraphReport.float_pools`).

`integer_op_counts(path)` lets ONNX Runtime optimize the model (ORT_ENABLE_ALL) into a temporary file
(`SessionOptions.optimized_model_filepath`) and counts its op types: QLinearConv is an integer conv,
Conv a float one.

Example:
    >>> report = rewrite_graph(proto)          # proto: onnx.ModelProto traced by onnx_integer.py
    >>> integer_op_counts("model-int8.onnx")   # {'QLinearConv': 49, 'QLinearAdd': 9, ...}
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qat.export.targets.errors import ConversionError

MOVES_VALUES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Pad")
WEIGHT_SUFFIX = ".weight_int8"  # initializer names of onnx_integer's int8 weights
INT32_LIMIT = 2**31 - 1


@dataclass
class GraphReport:
    """What `rewrite_graph` changed."""

    quantize_linear: int = 0  # QuantizeLinear nodes in the written graph
    int8_layers: list[str] = field(default_factory=list)  # Conv / Gemm nodes with an int8 weight, by layer
    int32_biases: int = 0
    largest_bias_rounding: float = 0.0  # max |b - b_int32 * s| / s_out over channels (s_out: the next Q's scale)
    rescaled_channels: dict[str, int] = field(default_factory=dict)  # layer -> channels given a larger scale
    largest_rescale_error: float = 0.0  # bound on the output change they cause, in output steps
    dropped_clips: int = 0
    global_pools: int = 0
    float_pools: int = 0  # spatial means left float: scales outside the integer kernel's range, or unknown size
    requantized: list[str] = field(default_factory=list)  # layers given a copy of their input's QDQ

    def __str__(self) -> str:
        text = (f"{len(self.int8_layers)} int8 layer(s), {self.int32_biases} int32 bias(es) (largest rounding "
                f"{self.largest_bias_rounding:.3g} of an output step), {self.dropped_clips} redundant Clip dropped, "
                f"{self.global_pools} GlobalAveragePool")
        if self.float_pools:
            text += (f"; {self.float_pools} spatial mean(s) left float (input / output scales outside "
                     "QLinearGlobalAveragePool's range, or the spatial size unknown)")
        if self.rescaled_channels:
            text += (f"; {sum(self.rescaled_channels.values())} channel(s) with a bias too large for int32 got a "
                     f"larger weight scale (output moved by <= {self.largest_rescale_error:.2g} step): "
                     + ", ".join(f"{layer} x{n}" for layer, n in self.rescaled_channels.items()))
        return text


class Graph:
    """Index of an onnx GraphProto: initializers, producers, consumers (rebuilt after each edit)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.reindex()

    def reindex(self) -> None:
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}

    def constant(self, name: str) -> Optional[np.ndarray]:
        """The value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
        return None

    def only_consumer(self, name: str) -> Optional[onnx.NodeProto]:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        name = self.fresh(name)
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def fresh(self, base: str) -> str:
        names = self.initializers.keys() | self.producer.keys()
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        return name

    def insert_before(self, anchor: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
        index = list(self.graph.node).index(anchor)
        for offset, node in enumerate(nodes):
            self.graph.node.insert(index + offset, node)
        self.reindex()

    def remove(self, node: onnx.NodeProto) -> None:
        self.graph.node.remove(node)
        self.reindex()


def layer_name(weight_initializer: str) -> str:
    """'model.blocks.0.expand.0.weight_int8' -> 'blocks.0.expand.0' (the module of the qat file)."""
    name = weight_initializer[: -len(WEIGHT_SUFFIX)]
    return name[len("model."):] if name.startswith("model.") else name


def quantize_value(value: float, scale: float, zero: int) -> int:
    """QuantizeLinear of one value to uint8 in float32 (round half to even), as ONNX Runtime computes it."""
    q = np.rint(np.float32(value) / np.float32(scale)) + zero
    return int(np.clip(q, 0, 255)) if np.isfinite(q) else (255 if q > 0 else 0)


def rewrite_graph(model: onnx.ModelProto) -> GraphReport:
    """The pass described in the module docstring, on `model` in place; returns what it did."""
    report = GraphReport()
    g = Graph(model.graph)
    for node in list(g.graph.node):
        weight = _int8_weight(g, node)
        if weight is not None:
            report.int8_layers.append(layer_name(weight))
            _check_quantized_input(g, node, layer_name(weight), report)
            _quantize_bias(g, node, layer_name(weight), report)
    for node in list(g.graph.node):
        if node.op_type in ("Clip", "Relu") and _redundant_clip(g, node):
            _bypass(g, node)
            report.dropped_clips += 1
    for node in list(g.graph.node):
        if node.op_type == "ReduceMean" and _spatial_mean(g, node, report):
            index = list(g.graph.node).index(node)
            g.graph.node.insert(index, helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                        name=g.fresh(node.name + "_global")))
            g.remove(node)
            report.global_pools += 1
    for node in list(g.graph.node):
        if node.op_type == "QuantizeLinear":
            _move_before_reshape(g, node)
    report.quantize_linear = sum(node.op_type == "QuantizeLinear" for node in g.graph.node)
    _remove_unused(g)
    return report


def _remove_unused(g: Graph) -> None:
    """Drop the initializers no node reads any more (the float biases, the dropped Clips' bounds) and the shape
    information of values no node makes any more."""
    used = {name for node in g.graph.node for name in node.input} | g.outputs
    for tensor in [t for t in g.graph.initializer if t.name not in used]:
        g.graph.initializer.remove(tensor)
        del g.initializers[tensor.name]
    for info in [i for i in g.graph.value_info if i.name not in g.producer]:
        g.graph.value_info.remove(info)


def _int8_weight(g: Graph, node: onnx.NodeProto) -> Optional[str]:
    """The int8 weight initializer of a Conv / Gemm fed by DequantizeLinear(int8 initializer), else None."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
        return None
    dq = g.producer.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.initializers:
        return None
    return dq.input[0] if g.initializers[dq.input[0]].data_type == onnx.TensorProto.INT8 else None


def _check_quantized_input(g: Graph, node: onnx.NodeProto, layer: str, report: GraphReport) -> None:
    """The layer's input must be a DequantizeLinear output, possibly through ops that only move values."""
    name, path = node.input[0], []
    while True:
        producer = g.producer.get(name)
        if producer is None:
            break
        if producer.op_type == "DequantizeLinear":
            if not path:
                return
            q = g.producer.get(producer.input[0])
            if q is None or q.op_type != "QuantizeLinear" or not _pad_keeps_grid(g, path):
                break
            quantized, dequantized = g.fresh(f"{layer}_input_q"), g.fresh(f"{layer}_input_dq")
            g.insert_before(node, [
                helper.make_node("QuantizeLinear", [node.input[0], *q.input[1:]], [quantized], name=quantized),
                helper.make_node("DequantizeLinear", [quantized, *producer.input[1:]], [dequantized],
                                 name=dequantized)])
            node.input[0] = dequantized
            g.reindex()
            report.requantized.append(layer)
            return
        if producer.op_type not in MOVES_VALUES:
            break
        path.append(producer)
        name = producer.input[0]
    raise ConversionError(f"cannot convert to onnx --integer: layer '{layer}': its input has no quantization "
                          "point before it (put a QuantPoint on the tensor it reads; the integer kernels take "
                          "8-bit inputs)")


def _pad_keeps_grid(g: Graph, path: list[onnx.NodeProto]) -> bool:
    """Pads on the path pad with the constant 0 (a code of every grid); other ops only move values."""
    for node in path:
        if node.op_type != "Pad":
            continue
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        value = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        if mode != "constant" or value is None or np.any(value != 0):
            return False
    return True


def _quantize_bias(g: Graph, node: onnx.NodeProto, layer: str, report: GraphReport) -> None:
    """Float bias -> DequantizeLinear(int32 round(b / (s_x * s_w[c])), s_x * s_w[c]); channels whose bias does not
    fit int32 at that scale get a larger weight scale (`_rescale_channels`)."""
    if len(node.input) < 3 or not node.input[2] or node.input[2] not in g.initializers:
        return
    bias = numpy_helper.to_array(g.initializers[node.input[2]]).astype(np.float64)
    x_dq, w_dq = g.producer[node.input[0]], g.producer[node.input[1]]
    x_scale, x_zero = g.constant(x_dq.input[1]), g.constant(x_dq.input[2]) if len(x_dq.input) > 2 else np.uint8(0)
    w_scale = g.constant(w_dq.input[1])
    if x_scale is None or x_zero is None or w_scale is None or x_scale.size != 1 or x_zero.dtype != np.uint8:
        raise ConversionError(f"cannot convert to onnx --integer: layer '{layer}': its input is not quantized to "
                              "uint8 per tensor with constant parameters")
    x_scale, x_code = np.float32(x_scale), max(int(x_zero), 255 - int(x_zero))  # x_code: largest |code - zero|
    w_scale = np.broadcast_to(w_scale.astype(np.float32), bias.shape).copy()
    codes = numpy_helper.to_array(g.initializers[w_dq.input[0]]).reshape(bias.shape[0], -1).astype(np.int64)
    limit = INT32_LIMIT - codes.shape[1] * x_code * 128  # room for the accumulator of any input
    needed = (np.abs(bias) / (float(x_scale) * limit)).astype(np.float32)
    out_scale = _output_scale(g, node)
    if (needed > w_scale).any():
        _rescale_channels(g, w_dq, codes, w_scale, needed, float(x_scale) * x_code, layer, out_scale, report)
    scale = (x_scale * w_scale).astype(np.float32)
    codes32 = np.rint(bias / scale.astype(np.float64))
    error = np.abs(bias - codes32 * scale.astype(np.float64))
    if out_scale is not None and error.size:
        report.largest_bias_rounding = max(report.largest_bias_rounding, float(error.max() / out_scale))
    int32_name = g.add_initializer(codes32.astype(np.int32), f"{layer}.bias_int32")
    scale_name = g.add_initializer(scale, f"{layer}.bias_scale")
    dequantized = g.fresh(f"{layer}_bias")
    g.insert_before(node, [helper.make_node("DequantizeLinear", [int32_name, scale_name], [dequantized], axis=0,
                                            name=dequantized)])
    node.input[2] = dequantized
    g.reindex()
    report.int32_biases += 1


def _rescale_channels(g: Graph, w_dq: onnx.NodeProto, codes: np.ndarray, w_scale: np.ndarray, needed: np.ndarray,
                      x_max: float, layer: str, out_scale: Optional[float], report: GraphReport) -> None:
    """Channels c with needed[c] > w_scale[c] (a bias too large for int32 at s_x * s_w[c]: a nearly dead channel,
    weights ~1e-7 after a BatchNorm with gamma ~0, bias of order 1) get the weight scale needed[c] and their codes
    rounded to it; `w_scale` is updated in place, the new codes and scales are written as new initializers.
    The output moves by at most sum_k |w_k - w'_k| * max|x|, tiny next to the output step (reported); more than
    half a step is refused."""
    rows = needed > w_scale
    new_scale = w_scale.copy()
    new_scale[rows] = needed[rows] * np.float32(1 + 1e-6)
    weights = codes * w_scale.astype(np.float64)[:, None]
    new_codes = codes.copy()
    new_codes[rows] = np.rint(weights[rows] / new_scale[rows].astype(np.float64)[:, None])
    moved = (np.abs(weights - new_codes * new_scale.astype(np.float64)[:, None]).sum(axis=1) * x_max)[rows]
    steps = float(moved.max() / out_scale) if out_scale else 0.0
    if steps > 0.5:
        raise ConversionError(f"cannot convert to onnx --integer: layer '{layer}': the bias of {int(rows.sum())} "
                              "channel(s) does not fit int32 at input_scale * weight_scale, and a weight scale it "
                              f"fits would move the output by up to {steps:.2g} of its step")
    shape = numpy_helper.to_array(g.initializers[w_dq.input[0]]).shape
    w_dq.input[0] = g.add_initializer(new_codes.astype(np.int8).reshape(shape), f"{layer}.weight_int8_rescaled")
    w_dq.input[1] = g.add_initializer(new_scale, f"{layer}.weight_scale_rescaled")
    w_scale[:] = new_scale
    report.rescaled_channels[layer] = int(rows.sum())
    report.largest_rescale_error = max(report.largest_rescale_error, steps)


def _output_scale(g: Graph, node: onnx.NodeProto) -> Optional[float]:
    """The scale of the QuantizeLinear reading the node's output (through a Clip / Relu), else None."""
    consumer = g.only_consumer(node.output[0])
    if consumer is not None and consumer.op_type in ("Clip", "Relu"):
        consumer = g.only_consumer(consumer.output[0])
    if consumer is None or consumer.op_type != "QuantizeLinear":
        return None
    scale = g.constant(consumer.input[1])
    return float(scale) if scale is not None and scale.size == 1 else None


def _redundant_clip(g: Graph, node: onnx.NodeProto) -> bool:
    """A Clip / Relu read only by a per-tensor uint8 QuantizeLinear mapping its bounds to codes 0 and 255."""
    q = g.only_consumer(node.output[0])
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
        return False
    low, high = (0.0, np.inf) if node.op_type == "Relu" else (_bound(g, node, 1, -np.inf), _bound(g, node, 2, np.inf))
    scale, zero = g.constant(q.input[1]), g.constant(q.input[2])
    if low is None or high is None or scale is None or zero is None or scale.size != 1 or zero.dtype != np.uint8:
        return False  # a bound computed at run time, or not a per-tensor uint8 quantizer
    return quantize_value(low, float(scale), int(zero)) == 0 and quantize_value(high, float(scale), int(zero)) == 255


def _bound(g: Graph, node: onnx.NodeProto, index: int, default: float) -> Optional[float]:
    """A Clip bound: its constant value, `default` when not given, None when computed at run time."""
    if len(node.input) <= index or not node.input[index]:
        return default
    value = g.constant(node.input[index])
    return None if value is None else float(value)


def _bypass(g: Graph, node: onnx.NodeProto) -> None:
    """Remove a one-input-one-output node, its consumers reading its input."""
    for user in g.consumers.get(node.output[0], []):
        for i, name in enumerate(user.input):
            if name == node.output[0]:
                user.input[i] = node.input[0]
    g.remove(node)


def _spatial_mean(g: Graph, node: onnx.NodeProto, report: GraphReport) -> bool:
    """ReduceMean over axes (2, 3) (or -2, -1) of a 4-D input, keepdims=1, that ONNX Runtime's integer pooling can
    compute: between a DequantizeLinear and a QuantizeLinear (directly or through a Reshape / Flatten), the
    spatial size known, and MLAS's range s_in / (s_out * H * W) in [2^-32, 256) (QLinearGlobalAveragePool
    fails at run time outside it: an output scale over 256 times finer than the mean of input steps). A mean
    outside the range stays a float ReduceMean between the DequantizeLinear and the QuantizeLinear."""
    keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    axes = g.constant(node.input[1]) if len(node.input) > 1 else None
    if axes is None:
        axes = next((np.array(a.ints) for a in node.attribute if a.name == "axes"), None)
    shape = _shape(g, node.input[0])
    if keepdims != 1 or axes is None or shape is None or len(shape) != 4:
        return False
    if sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
        return False
    dq, q = g.producer.get(node.input[0]), g.only_consumer(node.output[0])
    if q is not None and q.op_type in ("Reshape", "Flatten"):
        q = g.only_consumer(q.output[0])
    if dq is None or dq.op_type != "DequantizeLinear" or q is None or q.op_type != "QuantizeLinear":
        return True  # a float mean either way
    s_in, s_out = g.constant(dq.input[1]), g.constant(q.input[1])
    if s_in is None or s_out is None or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        report.float_pools += 1
        return False
    size = shape[2] * shape[3]
    ratio = np.float32(s_in) / (np.float32(s_out) * np.float32(size))
    if size >= 2**24 or not 2.0**-32 <= ratio < 256:
        report.float_pools += 1
        return False
    return True


def _shape(g: Graph, name: str) -> Optional[list]:
    """The dims of a value (ints, or names for dynamic ones) from the graph's shape information, else None."""
    for info in (*g.graph.value_info, *g.graph.input, *g.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]
    return None


def _move_before_reshape(g: Graph, q: onnx.NodeProto) -> None:
    """X -> Reshape -> Q  becomes  X -> Q -> Reshape (uint8), when the Reshape has no other consumer and Q is per
    tensor (it then commutes with moving values)."""
    reshape = g.producer.get(q.input[0])
    if reshape is None or reshape.op_type not in ("Reshape", "Flatten") or g.only_consumer(reshape.output[0]) is None:
        return
    scale = g.constant(q.input[1])
    if scale is None or scale.size != 1:
        return
    quantized = g.fresh(f"{q.name}_moved")
    moved = helper.make_node("QuantizeLinear", [reshape.input[0], *q.input[1:]], [quantized], name=quantized)
    moved.attribute.extend(q.attribute)
    reshape.input[0], reshape.output[0] = quantized, q.output[0]
    g.graph.node.remove(q)
    g.insert_before(reshape, [moved])


def integer_op_counts(path: str | os.PathLike, level: str = "all") -> dict[str, int]:
    """Op types (and counts) of the graph ONNX Runtime's CPU provider runs for the model at `path`:
    the session optimizes it (`level` 'all' or 'extended') and writes it out, and the written graph is counted."""
    import onnxruntime

    levels = {"all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3  # the warning that an ENABLE_ALL graph is hardware-specific
        onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return dict(Counter(node.op_type for node in optimized.graph.node))
