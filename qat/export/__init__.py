"""Deployable int4 checkpoints: export a trained fake-quant model, load it for inference.

    export_model(model, "model.safetensors", architecture={...}, recipe_hash=...) -> SizeReport
    load("model.safetensors", device="cpu", dtype=torch.bfloat16) -> nn.Module (packed layers)
    inspect_checkpoint("model.safetensors") -> InspectReport (printable)

The file format is described in docs/FORMAT.md; `qat.export.format` holds its names
and the `CheckpointError` hierarchy raised for bad files.
"""

from qat.export.format import (
    ArchitectureError,
    CheckpointError,
    ExportError,
    FormatVersionError,
    HeaderError,
    IntegrityError,
    MetadataError,
    NotQatCheckpointError,
    NotSafetensorsError,
    TensorMismatchError,
    TruncatedError,
)
from qat.export.inspect import InspectReport, inspect_checkpoint
from qat.export.load import load
from qat.export.report import LayerSize, SizeReport
from qat.export.runtime import InputQuantizer, PackedConv2d, PackedEmbedding, PackedLinear
from qat.export.save import export_model

__all__ = [
    "ArchitectureError",
    "CheckpointError",
    "ExportError",
    "FormatVersionError",
    "HeaderError",
    "InputQuantizer",
    "InspectReport",
    "IntegrityError",
    "LayerSize",
    "MetadataError",
    "NotQatCheckpointError",
    "NotSafetensorsError",
    "PackedConv2d",
    "PackedEmbedding",
    "PackedLinear",
    "SizeReport",
    "TensorMismatchError",
    "TruncatedError",
    "export_model",
    "inspect_checkpoint",
    "load",
]
