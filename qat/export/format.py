"""The qat int4 checkpoint format: names, version, metadata keys, dtypes and errors.

A checkpoint is one safetensors file (docs/FORMAT.md is the full description):

    <layer>.weight_packed   uint8 (N, K // 2)     int4 layout: two codes per byte, low nibble first
    <layer>.weight_codes    uint8 (N, K)          uint8 layout: one code per byte (5..8 bits, or odd K)
    <layer>.weight_scales   float16/bfloat16/float32 (N, K // group_size)
    <layer>.weight_zeros    uint8 (N, K // group_size), absent for symmetric layers
    <layer>.input_quantizer.scale / .zero_point    static input quantization, if any
    <anything else>         plain tensors (biases, norms, skipped layers) under their state_dict names

and the string metadata keys below. Every failure to read a file raises a subclass of
`CheckpointError` naming the file and the problem.

Example:
    >>> try:
    ...     model = qat.load("model.safetensors")
    ... except CheckpointError as err:
    ...     print(err)          # e.g. "model.safetensors: tensor 'fc.weight_scales' fails its SHA-256 check"
"""

from __future__ import annotations

import torch

FORMAT_NAME = "qat-int4"
FORMAT_VERSION = 1  # the newest version this code writes and reads

# Metadata keys (safetensors metadata is a str -> str map; structured values are JSON).
KEY_FORMAT = "qat.format"
KEY_VERSION = "qat.format_version"
KEY_LIBRARY = "qat.library_version"
KEY_ARCHITECTURE = "qat.architecture"
KEY_RECIPE = "qat.recipe_hash"
KEY_LAYERS = "qat.layers"
KEY_TIED = "qat.tied"
KEY_CHECKSUMS = "qat.tensor_sha256"
KEY_HEADER_DIGEST = "qat.header_sha256"
KEY_SPARSITY = "qat.sparsity"  # optional: pruning report of the exported weights
KEY_FOLDED = "qat.folded_batchnorm"  # optional: {BatchNorm name: conv name} folded into the conv (weight, bias)
REQUIRED_KEYS = (KEY_FORMAT, KEY_VERSION, KEY_LIBRARY, KEY_ARCHITECTURE, KEY_RECIPE, KEY_LAYERS, KEY_TIED,
                 KEY_CHECKSUMS, KEY_HEADER_DIGEST)

# Tensor names inside a quantized layer `<layer>.`.
PACKED = "weight_packed"
CODES = "weight_codes"
SCALES = "weight_scales"
ZEROS = "weight_zeros"
INPUT_SCALE = "input_quantizer.scale"
INPUT_ZERO = "input_quantizer.zero_point"

LAYOUT_INT4 = "int4"  # two codes per byte, low nibble first
LAYOUT_UINT8 = "uint8"  # one code per byte
LAYER_TYPES = ("Linear", "Conv2d", "Embedding", "QuantPoint")  # QuantPoint: an input quantizer, no weight

# safetensors dtype names <-> torch dtypes (the ones qat reads and writes).
ST_TO_TORCH = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
TORCH_TO_ST = {dtype: name for name, dtype in ST_TO_TORCH.items()}
SCALE_DTYPE_TO_ST = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
FLOAT_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                     "float64": torch.float64}

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: its message names the file and the problem."""


class NotSafetensorsError(CheckpointError):
    """The file is not a safetensors file (for example a pickle or a torch.save zip)."""


class TruncatedError(CheckpointError):
    """The file ends before the header or the tensor data it declares."""


class HeaderError(CheckpointError):
    """The safetensors header is malformed (bad JSON, bad entries, bad offsets)."""


class NotQatCheckpointError(CheckpointError):
    """A valid safetensors file that is not a qat checkpoint (no qat format metadata)."""


class FormatVersionError(CheckpointError):
    """The file declares a format version this qat does not read (newer or unknown)."""


class MetadataError(CheckpointError):
    """qat metadata is missing, malformed, or inconsistent with the tensors."""


class IntegrityError(CheckpointError):
    """A SHA-256 check failed: the header or a tensor payload was altered."""


class TensorMismatchError(CheckpointError):
    """Tensors are missing, unexpected, mis-shaped, of the wrong dtype, or hold invalid values."""


class ArchitectureError(CheckpointError):
    """The model architecture recorded in the file cannot be rebuilt or does not fit the tensors."""


class ExportError(ValueError):
    """A model cannot be exported (the message names the layer and the fix)."""


def layer_tensor(layer: str, suffix: str) -> str:
    """The file name of tensor `suffix` of layer `layer` (e.g. 'fc.weight_packed')."""
    return f"{layer}.{suffix}" if layer else suffix
