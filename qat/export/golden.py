"""Golden inputs and outputs stored in a checkpoint (`qat.golden`), for `qat verify`.

`export_model(..., golden_inputs=...)` runs the model on a few inputs and stores them with
the outputs in the metadata key `qat.golden` (JSON, docs/FORMAT.md section 3):

    {"inputs": [tensor, ...], "output": tensor, "output_sha256": hex, "output_numel": n,
     "computed_with": {"torch": version, "by": "fake-quant model, float32"}}
    tensor = {"dtype": "float32" | "int64" | ..., "shape": [...], "data": base64 of the raw little-endian bytes}

The stored output is the first `MAX_OUTPUT_VALUES` values of the flattened output (all of it
for small models); `output_sha256` hashes the whole output as float32. A deployment reruns
the inputs (`qat verify`) and compares.

Example:
    >>> golden = qat.export.manifest.read_golden("model.safetensors")      # None when the file has no golden data
    >>> golden.inputs[0].shape, golden.output.shape
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from qat.export.format import MetadataError

KEY_GOLDEN = "qat.golden"
MAX_OUTPUT_VALUES = 65536  # values of the output kept in the file (the hash covers all of it)
GOLDEN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in GOLDEN_DTYPES.items()}


@dataclass
class Golden:
    """Golden inputs (the model's positional inputs) and the float32 output the exporter computed."""

    inputs: list[Tensor]
    output: Tensor  # float32, flattened prefix of at most MAX_OUTPUT_VALUES values
    output_shape: tuple
    output_sha256: str
    computed_with: dict

    @property
    def complete(self) -> bool:
        """Whether `output` holds every value of the output (else only its first values)."""
        return self.output.numel() == math.prod(self.output_shape)


def output_tensor(out: Any) -> Tensor:
    """A model's output as one float32 CPU tensor (the first output of a tuple or Hugging Face ModelOutput)."""
    tensor = out if isinstance(out, Tensor) else out[0]
    return tensor.detach().float().cpu().contiguous()


def float32_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's values as contiguous little-endian float32."""
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().reshape(-1).numpy().tobytes()).hexdigest()


@torch.no_grad()
def compute_golden(model: nn.Module, inputs: Sequence[Tensor], by: str) -> Golden:
    """Run `model` (eval mode) on `inputs` and record inputs and output."""
    inputs = [t.detach().cpu().contiguous() for t in inputs]
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        output = output_tensor(model(*(t.to(device) for t in inputs)))
    finally:
        model.train(was_training)
    return Golden(inputs=inputs, output=output.reshape(-1)[:MAX_OUTPUT_VALUES].clone(),
                  output_shape=tuple(output.shape), output_sha256=float32_sha256(output),
                  computed_with={"torch": torch.__version__, "by": by})


def _encode_tensor(tensor: Tensor) -> dict:
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"golden tensors must be one of {sorted(GOLDEN_DTYPES)}, got {tensor.dtype}")
    raw = tensor.contiguous().reshape(-1).view(torch.uint8) if tensor.dtype != torch.bool else tensor.to(torch.uint8)
    data = base64.b64encode(raw.numpy().tobytes()).decode("ascii")
    return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data": data}


def encode_golden(golden: Golden) -> str:
    """The `qat.golden` metadata value (JSON text)."""
    return json.dumps({
        "inputs": [_encode_tensor(t) for t in golden.inputs],
        "output": _encode_tensor(golden.output),
        "output_shape": list(golden.output_shape),
        "output_sha256": golden.output_sha256,
        "computed_with": golden.computed_with,
    }, sort_keys=True)


def _decode_tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise ValueError(f"{what} must be an object with exactly 'dtype', 'shape' and 'data'")
    dtype = GOLDEN_DTYPES.get(value["dtype"])
    shape = value["shape"]
    if dtype is None:
        raise ValueError(f"{what} has dtype {value['dtype']!r}; allowed: {sorted(GOLDEN_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in shape):
        raise ValueError(f"{what} has shape {shape!r}, not a list of non-negative integers")
    try:
        raw = base64.b64decode(value["data"], validate=True) if isinstance(value["data"], str) else None
    except binascii.Error:
        raw = None
    if raw is None:
        raise ValueError(f"{what} 'data' is not base64 text")
    itemsize = 1 if dtype == torch.bool else dtype.itemsize
    if len(raw) != math.prod(shape) * itemsize:
        raise ValueError(f"{what} holds {len(raw)} bytes; dtype {value['dtype']} and shape {shape} need "
                         f"{math.prod(shape) * itemsize}")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    tensor = flat.to(torch.bool) if dtype == torch.bool else flat.view(dtype)
    return tensor.reshape(shape).clone()


def decode_golden(text: str, path: str = "") -> Golden:
    """Parse and check a `qat.golden` value; raises `MetadataError` naming the problem."""
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or set(value) != {"inputs", "output", "output_shape", "output_sha256",
                                                         "computed_with"}:
            raise ValueError("must be an object with keys inputs, output, output_shape, output_sha256, computed_with")
        if not isinstance(value["inputs"], list) or not value["inputs"]:
            raise ValueError("'inputs' must be a non-empty list")
        inputs = [_decode_tensor(t, f"input {i}") for i, t in enumerate(value["inputs"])]
        output = _decode_tensor(value["output"], "output")
        shape = value["output_shape"]
        if not isinstance(shape, list) or output.dtype != torch.float32 or output.dim() != 1:
            raise ValueError("'output' must be a flat float32 tensor and 'output_shape' a list")
        if output.numel() != min(math.prod(shape), MAX_OUTPUT_VALUES):
            raise ValueError(f"'output' holds {output.numel()} values; output_shape {shape} needs "
                             f"{min(math.prod(shape), MAX_OUTPUT_VALUES)}")
        digest = value["output_sha256"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError("'output_sha256' must be a lowercase hex SHA-256")
        golden = Golden(inputs, output, tuple(shape), digest, value["computed_with"])
        if golden.complete and float32_sha256(output) != digest:
            raise ValueError("the stored output values do not match 'output_sha256'")
        return golden
    except (ValueError, TypeError, RecursionError) as err:
        raise MetadataError(f"{path}: metadata '{KEY_GOLDEN}' is invalid: {err}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a whole file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
