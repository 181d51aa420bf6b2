"""`qat export FILE --to onnx`: an ONNX graph whose quantized Linear layers are MatMulNBits.

The qat file is loaded with `qat.load` (reference kernel), then each packed layer is
swapped for a module that exports as the ONNX form of the same numbers:

    Linear, 2-4 bits   com.microsoft MatMulNBits (bits=4): our codes and scales, re-laid out, never
                       re-quantized (matmul_nbits.py gives the mapping; a 2- or 3-bit code and its zero
                       are the same numbers in a 4-bit container); static input quantization as
                       Div / Round / Add / Clip / Sub / Mul in float32 (bit for bit as qat.load)
    Conv2d             a float Conv whose weight is the exact dequantized weight ((u - zero) * scale in
                       float32): ONNX Runtime has no int4 convolution. Size: 32 bits per conv weight.
    Embedding          a Gather over the exact dequantized table (float32), for the same reason
    other Linear       refused (more than 4 bits, groups MatMulNBits cannot hold), or with
                       `dequantize_unsupported=True` a float MatMul on the exact dequantized weight

`weights="float"` writes every quantized layer as float (the float ONNX model the benchmark
compares with). The graph is traced by `torch.onnx.export(dynamo=True)` on example inputs:
given, or the golden inputs stored in the qat file. Batch (and, for integer inputs such as
token ids, sequence) dimensions are dynamic.

Example:
    >>> export_onnx("digits.safetensors", "digits.onnx")          # golden inputs give the input shapes
    >>> export_onnx("lm.safetensors", "lm.onnx", example_inputs=(torch.zeros(1, 16, dtype=torch.long),))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from qat.export import golden
from qat.export.format import LAYOUT_INT4
from qat.export.load import load
from qat.export.manifest import read_golden
from qat.export.runtime import PackedConv2d, PackedEmbedding, PackedLinear, _PackedWeight
from qat.export.targets.errors import ConversionError, refuse
from qat.export.targets.matmul_nbits import choose_layout, nbits_tensors, translations
from qat.kernels.reference import unpack_int4

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
METADATA_SOURCE = "qat.source_sha256"


@dataclass
class OnnxReport:
    """What `export_onnx` wrote: the file, and how each quantized layer was represented."""

    path: str
    matmul_nbits: list[str] = field(default_factory=list)
    dequantized: dict[str, str] = field(default_factory=dict)  # layer -> why it is float in the graph

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.matmul_nbits)} MatMulNBits layer(s), {len(self.dequantized)} float"]
        lines += [f"  {name}: float ({why})" for name, why in self.dequantized.items()]
        return "\n".join(lines)


def layer_codes(module: _PackedWeight) -> tuple[Tensor, Tensor, Tensor]:
    """Stored codes uint8 (N, K), scales (N, G) and zeros uint8 (N, G) (implied zeros filled in)."""
    w = module.weight_spec
    codes = unpack_int4(module.weight_packed) if w.layout == LAYOUT_INT4 else module.weight_codes
    zeros = module.weight_zeros
    if zeros is None:
        zeros = torch.full(module.weight_scales.shape, w.implied_zero, dtype=torch.uint8)
    return codes, module.weight_scales, zeros


class NBitsLinear(nn.Module):
    """A packed Linear in MatMulNBits form: exports as one MatMulNBits node (plus input quantization, bias)."""

    def __init__(self, packed: PackedLinear, accuracy_level: int, name: str) -> None:
        super().__init__()
        w = packed.weight_spec
        if w.bits > 4:  # 2- and 3-bit codes (and zeros) fit a 4-bit container unchanged
            raise refuse("onnx", name, f"{w.bits}-bit weights; MatMulNBits is written for at most 4 bits")
        layout = choose_layout(w.columns, w.group_size)
        if layout is None:
            raise refuse("onnx", name, f"group size {w.group_size} (K={w.columns}): MatMulNBits blocks are "
                         "powers of two >= 16, so the group must be a multiple of 16 (or the whole row, K <= 256)")
        codes, scales, zeros = layer_codes(packed)
        default_zero = w.zeros is False and w.implied_zero == 8
        b, block_scales, zero_points = nbits_tensors(codes, scales, zeros, layout, default_zero)
        self.register_buffer("b", b)
        self.register_buffer("scales", block_scales)
        self.register_buffer("zero_points", zero_points)
        self.bias = packed.bias
        self.input_quantizer = packed.input_quantizer
        self.k, self.n, self.block_size, self.accuracy_level = w.columns, w.rows, layout.block_size, accuracy_level

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = torch.ops.qat_onnx.matmul_nbits(x, self.b, self.scales, self.zero_points, self.k, self.n,
                                            self.block_size, self.accuracy_level)
        return y if self.bias is None else y + self.bias


def float_layer(packed: _PackedWeight) -> nn.Module:
    """The float layer holding `packed`'s exact dequantized weight (input quantization kept in front)."""
    weight = nn.Parameter(packed.dequantized_weight(), requires_grad=False)
    if isinstance(packed, PackedEmbedding):
        layer = nn.Embedding(packed.num_embeddings, packed.embedding_dim, padding_idx=packed.padding_idx,
                             _weight=weight.to(packed.output_dtype), _freeze=True)
        return layer
    if isinstance(packed, PackedConv2d):
        layer = nn.Conv2d(packed.in_channels, packed.out_channels, packed.kernel_size, packed.stride,
                          packed.padding, packed.dilation, packed.groups, bias=False,
                          padding_mode=packed.padding_mode, device="meta")
    else:
        layer = nn.Linear(packed.in_features, packed.out_features, bias=False, device="meta")
    layer.weight, layer.bias = weight, packed.bias
    if packed.input_quantizer is None:
        return layer
    return nn.Sequential(packed.input_quantizer, layer)


def convert_layers(model: nn.Module, weights: str = "int4", accuracy_level: int = 0,
                   dequantize_unsupported: bool = False) -> OnnxReport:
    """Swap every packed layer of a loaded model for its ONNX form (in place); returns what each became."""
    report = OnnxReport(path="")
    packed_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _PackedWeight)]
    for name, module in packed_layers:
        replacement, why = _onnx_layer(name, module, weights, accuracy_level, dequantize_unsupported)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        if why is None:
            report.matmul_nbits.append(name)
        else:
            report.dequantized[name] = why
    return report


def _onnx_layer(name: str, module: _PackedWeight, weights: str, accuracy_level: int,
                dequantize_unsupported: bool) -> tuple[nn.Module, Optional[str]]:
    if isinstance(module, PackedEmbedding):
        return float_layer(module), "embedding table, exact dequantized values"
    if isinstance(module, PackedConv2d):
        return float_layer(module), "convolution, exact dequantized values"
    if weights == "float":
        return float_layer(module), "weights='float'"
    try:
        return NBitsLinear(module, accuracy_level, name), None
    except ConversionError as err:
        if not dequantize_unsupported:
            raise ConversionError(f"{err}; pass dequantize_unsupported=True (--dequantize-unsupported) to "
                                  "store this layer as exact float weights") from None
        return float_layer(module), str(err).split(": ", 2)[-1]


class FirstOutput(nn.Module):
    """Calls the model and returns its first tensor output (logits of a Hugging Face ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> Tensor:
        out = self.model(*inputs)
        return out if isinstance(out, Tensor) else out[0]


def _dynamic_dims(t: Tensor) -> tuple[int, ...]:
    """Batch, and for integer inputs (token ids) of 2+ dims also the sequence dimension."""
    return (0, 1) if not t.is_floating_point() and t.dim() >= 2 else (0,)


def _dynamic_shapes(inputs: Sequence[Tensor]) -> tuple:
    return tuple({dim: torch.export.Dim.AUTO for dim in _dynamic_dims(t)} for t in inputs)


def _trace_inputs(inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The example inputs with every dynamic size-1 dimension doubled: torch.export fixes sizes 0 and 1."""
    traced = []
    for t in inputs:
        for dim in _dynamic_dims(t):
            if t.shape[dim] == 1:
                t = torch.cat([t, t], dim=dim)
        traced.append(t)
    return tuple(traced)


def export_onnx(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    example_inputs: Optional[Sequence[Tensor]] = None,
    weights: str = "int4",
    accuracy_level: int = 0,
    dequantize_unsupported: bool = False,
) -> OnnxReport:
    """Write the qat file `path` as an ONNX model at `out`; returns an `OnnxReport`.

    `example_inputs` (the model's positional inputs) fix the traced shapes; without them the
    golden inputs stored in the file are used. The model's golden inputs and outputs are
    copied into the ONNX metadata (`qat.golden`) so `qat verify out.onnx` can check the runtime.
    """
    if weights not in ("int4", "float"):
        raise ValueError(f"weights={weights!r}; allowed: 'int4', 'float'")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level={accuracy_level!r}; allowed: {ACCURACY_LEVELS}")
    stored = read_golden(path)
    if example_inputs is None:
        if stored is None:
            raise ConversionError(f"{path}: no golden inputs in the file to trace the graph with; pass "
                                  "example_inputs (qat export --to onnx --input-shape ...)")
        example_inputs = stored.inputs
    model = load(path, kernel_backend="reference")
    report = convert_layers(model, weights, accuracy_level, dequantize_unsupported)
    report.path = os.fspath(out)
    inputs = _trace_inputs(example_inputs)
    program = torch.onnx.export(
        FirstOutput(model).eval(), inputs, dynamo=True, custom_translation_table=translations(), optimize=True,
        input_names=[f"input_{i}" for i in range(len(inputs))], output_names=["output"],
        dynamic_shapes=(_dynamic_shapes(inputs),), verbose=False,
    )
    program.model.metadata_props[METADATA_SOURCE] = golden.file_sha256(path)
    program.model.metadata_props["qat.layers"] = json.dumps({"matmul_nbits": report.matmul_nbits,
                                                             "float": report.dequantized}, sort_keys=True)
    if stored is not None:
        program.model.metadata_props[golden.KEY_GOLDEN] = golden.encode_golden(stored)
    program.save(os.fspath(out))
    return report


def onnx_session(path: str | os.PathLike, threads: Optional[int] = None):
    """An onnxruntime CPU InferenceSession for `path` (`threads` intra-op threads, default: ORT's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: Sequence[Tensor]) -> Tensor:
    """Run an ONNX model written by `export_onnx` on torch inputs; returns its output as a tensor."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])
