"""Converters from the qat int4 file to the formats other runtimes serve.

    onnx.py                ONNX graph, quantized Linear layers as ONNX Runtime's com.microsoft MatMulNBits
    compressed_tensors.py  Hugging Face folder in the compressed-tensors pack-quantized format (transformers, vLLM)
    gguf.py                GGUF file (Q4_0 / Q4_1 blocks from our codes) for llama.cpp, Llama architectures

Every converter reads the qat file (never a float model), so the trained codes and scales
travel unchanged, and refuses with `ConversionError` (naming the layer and the reason)
whatever the target cannot represent exactly.

Example:
    >>> from qat.export.targets import convert
    >>> convert("model.safetensors", "onnx", "model.onnx")
"""

from __future__ import annotations

import os
from typing import Any, Callable

from qat.export.targets.errors import ConversionError, refuse

__all__ = ["TARGETS", "ConversionError", "convert", "refuse"]


def _onnx(path: str, out: str, kv_cache: bool = False, **options: Any) -> Any:
    if kv_cache:  # a causal LM graph with past / present key-value tensors (onnx_cache.py)
        from qat.export.targets.onnx_cache import export_onnx_with_cache

        if "example_inputs" in options:
            raise ConversionError("--kv-cache graphs take ids and cache tensors of any size: no example input")
        return export_onnx_with_cache(path, out, **options)
    from qat.export.targets.onnx import export_onnx

    return export_onnx(path, out, **options)


def _compressed_tensors(path: str, out: str, **options: Any) -> Any:
    from qat.export.targets.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(path, out, **options)


def _gguf(path: str, out: str, **options: Any) -> Any:
    from qat.export.targets.gguf import export_gguf

    return export_gguf(path, out, **options)


TARGETS: dict[str, Callable[..., Any]] = {"onnx": _onnx, "compressed-tensors": _compressed_tensors, "gguf": _gguf}


def convert(path: str | os.PathLike, target: str, out: str | os.PathLike, **options: Any) -> Any:
    """Convert the qat file `path` to `target` (a key of `TARGETS`), written at `out`."""
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return TARGETS[target](os.fspath(path), os.fspath(out), **options)
