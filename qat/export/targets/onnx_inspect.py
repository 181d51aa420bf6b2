"""`qat inspect model.onnx`: what an ONNX file written by `qat export --to onnx` holds, without running it.

The metadata qat wrote (the SHA-256 of the qat file it came from, which layers became MatMulNBits and
which float, golden data for `qat verify`, the KV-cache inputs), the graph's inputs and outputs, every
MatMulNBits node (K, N, bits, block size, accuracy level, bytes) and the bytes of the initializers;
`check` runs the ONNX checker. Needs the `onnx` package.

Example:
    >>> report = inspect_onnx("digits.onnx")
    >>> print(report)
    >>> report.ok
    True
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import onnx
from onnx import helper

from qat.export.columns import table
from qat.export.format import MetadataError
from qat.export.golden import KEY_GOLDEN, decode_golden
from qat.export.targets.onnx import METADATA_SOURCE

KEY_LAYERS, KEY_KV_CACHE = "qat.layers", "qat.kv_cache"  # written by onnx.py and onnx_cache.py
NBITS_COLUMNS = ("layer", "K (in)", "N (out)", "bits", "block", "accuracy level", "bytes", "bits/weight")


@dataclass
class NBitsNode:
    """One MatMulNBits node: its layer (from the weight's initializer name), shape and stored bytes."""

    layer: str
    k: int
    n: int
    bits: int
    block_size: int
    accuracy_level: int
    stored_bytes: int  # packed codes, scales and zero points

    def row(self) -> list[Any]:
        return [self.layer, self.k, self.n, self.bits, self.block_size, self.accuracy_level, f"{self.stored_bytes:,}",
                f"{8 * self.stored_bytes / (self.k * self.n):.3f}"]


@dataclass
class OnnxInspectReport:
    """The result of inspecting an ONNX file: `ok` is False when the checker or the golden data failed."""

    path: str
    file_bytes: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # the qat.* entries
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    nbits: list[NBitsNode] = field(default_factory=list)
    initializer_bytes: int = 0
    golden: Optional[str] = None  # what the golden data holds, or why it is unreadable
    checked: Optional[str] = None  # the ONNX checker's verdict; None when not run
    ok: bool = True

    def __str__(self) -> str:
        opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in sorted(self.opsets.items()))
        lines = [f"file: {self.path} (ONNX, {self.file_bytes:,} bytes; opsets {opsets})"]
        source = self.metadata.get(METADATA_SOURCE)
        lines.append(f"converted from: the qat file with SHA-256 {source}" if source else
                     "converted from: - (no qat metadata: not written by qat export --to onnx)")
        lines += [f"inputs: {', '.join(self.inputs)}", f"outputs: {', '.join(self.outputs)}"]
        if KEY_KV_CACHE in self.metadata:
            lines.append(f"kv cache: {self.metadata[KEY_KV_CACHE]}")
        lines.append(f"golden data: {self.golden or '- (qat verify needs it)'}")
        lines.append(f"MatMulNBits layers ({len(self.nbits)}):")
        if self.nbits:
            lines += table(NBITS_COLUMNS, [node.row() for node in self.nbits])
        for name, why in sorted(self._float_layers().items()):
            lines.append(f"float layer: {name} ({why})")
        nbits_bytes = sum(node.stored_bytes for node in self.nbits)
        lines.append(f"size: initializers {self.initializer_bytes:,} bytes: MatMulNBits {nbits_bytes:,}, "
                     f"other {self.initializer_bytes - nbits_bytes:,}")
        lines.append(f"check: {self.checked or 'not run'}")
        return "\n".join(lines)

    def _float_layers(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.metadata.get(KEY_LAYERS, "{}")).get("float", {}))
        except (ValueError, AttributeError):
            return {}


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Stored bytes of an initializer (external data included, from its recorded length)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in entries:
            return int(entries["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    return math.prod(tensor.dims) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _value_info(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return f"{value.name} {helper.tensor_dtype_to_np_dtype(tensor.elem_type).name} [{', '.join(dims)}]"


def _layer_name(weight: str) -> str:
    """'model.classifier.1.b' -> 'classifier.1' (the exporter names a layer's packed codes <module>.b)."""
    return weight.removeprefix("model.").removesuffix(".b")


def inspect_onnx(path: str | os.PathLike, check: bool = True) -> OnnxInspectReport:
    """Describe the ONNX file `path` (its external data is not read); with `check`, run the ONNX checker."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    report = OnnxInspectReport(path=os.fspath(path), file_bytes=Path(path).stat().st_size,
                               opsets={opset.domain: opset.version for opset in model.opset_import},
                               metadata={p.key: p.value for p in model.metadata_props if p.key.startswith("qat.")})
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    report.initializer_bytes = sum(_tensor_bytes(tensor) for tensor in initializers.values())
    report.inputs = [_value_info(value) for value in graph.input if value.name not in initializers]
    report.outputs = [_value_info(value) for value in graph.output]
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        stored = sum(_tensor_bytes(initializers[name]) for name in node.input[1:4] if name in initializers)
        report.nbits.append(NBitsNode(_layer_name(node.input[1]), attributes["K"], attributes["N"],
                                      attributes.get("bits", 4), attributes["block_size"],
                                      attributes.get("accuracy_level", 0), stored))
    if KEY_GOLDEN in report.metadata:
        try:
            golden = decode_golden(report.metadata[KEY_GOLDEN], report.path)
            shapes = ", ".join("x".join(str(size) for size in t.shape) for t in golden.inputs)
            report.golden = f"{len(golden.inputs)} input(s) ({shapes}) and the output: `qat verify {path}` reruns them"
        except MetadataError as err:
            report.golden, report.ok = f"unreadable ({err})", False
    if check:
        try:
            onnx.checker.check_model(model)
            report.checked = "OK (onnx.checker)"
        except onnx.checker.ValidationError as err:
            report.checked, report.ok = f"FAILED - {str(err).splitlines()[0]}", False
    return report
