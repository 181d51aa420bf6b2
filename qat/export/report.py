"""How big a checkpoint is, and how much smaller its quantized weights are than float.

Computed from the header alone (no payload read), so `export_model` and `qat inspect`
report the same numbers.

Example:
    >>> report = export_model(model, "model.safetensors")
    >>> print(report)                 # bytes on disk, bits per weight, ratios vs fp32 / bf16
    >>> report.ratio_vs_fp32          # e.g. 7.76 at int4, group size 128, fp16 scales
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qat.export.format import layer_tensor
from qat.export.manifest import Manifest
from qat.export.reader import Header


@dataclass(frozen=True)
class LayerSize:
    """One quantized weight: its element count and stored bytes (codes + scales + zeros)."""

    name: str
    type: str
    bits: int
    group_size: int
    weights: int
    stored_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.weights if self.weights else 0.0


@dataclass
class SizeReport:
    """Sizes of a checkpoint. Ratios compare the quantized weights with the same weights in fp32 / bf16.

    Attributes:
        file_bytes: bytes on disk.
        header_bytes: the 8-byte length plus the JSON header (metadata included).
        quantized_weights: number of weight elements stored quantized.
        quantized_bytes: bytes of their codes, scales and zeros.
        other_bytes: bytes of every other tensor (biases, norms, skipped layers, input qparams).
        layers: per-layer sizes, in file order of layer names.
    """

    file_bytes: int
    header_bytes: int
    quantized_weights: int
    quantized_bytes: int
    other_bytes: int
    layers: list[LayerSize] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight, scales and zeros included."""
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def ratio_vs_fp32(self) -> float:
        return 4 * self.quantized_weights / self.quantized_bytes if self.quantized_bytes else 0.0

    @property
    def ratio_vs_bf16(self) -> float:
        return 2 * self.quantized_weights / self.quantized_bytes if self.quantized_bytes else 0.0

    def __str__(self) -> str:
        lines = [
            f"file: {self.file_bytes:,} bytes (header {self.header_bytes:,}, quantized weights "
            f"{self.quantized_bytes:,}, other tensors {self.other_bytes:,})",
            f"quantized weights: {self.quantized_weights:,} in {len(self.layers)} layer(s), "
            f"{self.bits_per_weight:.3f} bits/weight incl. scales and zeros",
            f"vs fp32: {self.ratio_vs_fp32:.2f}x smaller   vs bf16: {self.ratio_vs_bf16:.2f}x smaller",
        ]
        return "\n".join(lines)


def size_report(header: Header, manifest: Manifest) -> SizeReport:
    """The `SizeReport` of a validated checkpoint header."""
    layers = []
    for name, spec in sorted(manifest.layers.items()):
        if spec.weight is None:
            continue
        names = [layer_tensor(name, suffix) for suffix in spec.weight.tensor_shapes()]
        if any(n in manifest.tied for n in names):
            continue  # a table tied to another layer's: stored (and counted) once, with that layer
        stored = sum(header.tensors[n].nbytes for n in names)
        weight = spec.weight
        layers.append(LayerSize(name, spec.type, weight.bits, weight.group_size, weight.rows * weight.columns, stored))
    quantized_bytes = sum(layer.stored_bytes for layer in layers)
    total_tensor_bytes = sum(entry.nbytes for entry in header.tensors.values())
    return SizeReport(
        file_bytes=header.file_size,
        header_bytes=header.data_start,
        quantized_weights=sum(layer.weights for layer in layers),
        quantized_bytes=quantized_bytes,
        other_bytes=total_tensor_bytes - quantized_bytes,
        layers=layers,
    )
