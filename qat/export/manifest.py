"""The qat metadata of a checkpoint: building it at export, checking it at load.

The header digest (`qat.header_sha256`) is the SHA-256 of the canonical JSON

    {"metadata": {every metadata key except qat.header_sha256: value},
     "tensors": {name: [safetensors dtype, shape]}}

(keys sorted, separators "," and ":", ASCII only). Together with the per-tensor SHA-256
of `qat.tensor_sha256` it makes any changed byte of the file detectable.

Example:
    >>> manifest = read_manifest(read_header("model.safetensors"))
    >>> manifest.layers["fc"].weight.bits
    4
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from qat.export.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_ARCHITECTURE,
    KEY_CHECKSUMS,
    KEY_FOLDED,
    KEY_FORMAT,
    KEY_HEADER_DIGEST,
    KEY_LAYERS,
    KEY_LIBRARY,
    KEY_RECIPE,
    KEY_SPARSITY,
    KEY_TIED,
    KEY_VERSION,
    REQUIRED_KEYS,
    FormatVersionError,
    IntegrityError,
    MetadataError,
    NotQatCheckpointError,
    TensorMismatchError,
    layer_tensor,
)
from qat.export.golden import KEY_GOLDEN, Golden, decode_golden
from qat.export.reader import Header, read_header
from qat.export.spec import LayerSpec

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Manifest:
    """What a checkpoint's qat metadata says, checked against its tensors."""

    format_version: int
    library_version: str
    architecture: Optional[dict]
    recipe_hash: str
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    sparsity: Optional[dict] = None
    golden: Optional[Golden] = None  # `qat.golden`: inputs and outputs for `qat verify`
    folded: dict[str, str] = field(default_factory=dict)  # `qat.folded_batchnorm`: {BN name: conv name}

    def layer_tensor_names(self) -> set[str]:
        """File names of every tensor owned by a quantized layer (packed weights, scales, qparams)."""
        return {layer_tensor(name, suffix) for name, spec in self.layers.items() for suffix in spec.tensor_shapes()}


def header_digest(metadata: dict[str, str], tensors: dict[str, tuple[str, tuple]]) -> str:
    """SHA-256 (hex) of the canonical JSON of the metadata (without the digest) and the tensor index."""
    canonical = {
        "metadata": {k: v for k, v in metadata.items() if k != KEY_HEADER_DIGEST},
        "tensors": {name: [dtype, list(shape)] for name, (dtype, shape) in tensors.items()},
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_manifest(header: Header) -> Manifest:
    """Check format name, version, header digest and the layer specs; raises `CheckpointError`s."""
    path, metadata = header.path, header.metadata
    if metadata.get(KEY_FORMAT) != FORMAT_NAME:
        found = metadata.get(KEY_FORMAT)
        detail = "no 'qat.format' metadata" if found is None else f"qat.format={found!r}"
        raise NotQatCheckpointError(f"{path}: a safetensors file but not a qat checkpoint ({detail}; "
                                    f"expected {FORMAT_NAME!r})")
    version = _version(path, metadata.get(KEY_VERSION))
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise MetadataError(f"{path}: metadata keys missing: {', '.join(missing)}")
    index = {name: (entry.st_dtype, entry.shape) for name, entry in header.tensors.items()}
    if header_digest(metadata, index) != metadata[KEY_HEADER_DIGEST]:
        raise IntegrityError(f"{path}: the header fails its SHA-256 check (metadata or tensor index altered)")
    manifest = Manifest(
        format_version=version,
        library_version=metadata[KEY_LIBRARY],
        architecture=_architecture(path, _json(path, metadata, KEY_ARCHITECTURE)),
        recipe_hash=metadata[KEY_RECIPE],
        layers=_layers(path, _json(path, metadata, KEY_LAYERS)),
        tied=_string_map(path, KEY_TIED, _json(path, metadata, KEY_TIED)),
        checksums=_string_map(path, KEY_CHECKSUMS, _json(path, metadata, KEY_CHECKSUMS)),
        sparsity=_sparsity(path, metadata),
        golden=decode_golden(metadata[KEY_GOLDEN], path) if KEY_GOLDEN in metadata else None,
        folded=_string_map(path, KEY_FOLDED, _json(path, metadata, KEY_FOLDED)) if KEY_FOLDED in metadata else {},
    )
    _check_tensors(path, header, manifest)
    return manifest


def _sparsity(path: str, metadata: dict) -> Optional[dict]:
    if KEY_SPARSITY not in metadata:
        return None
    value = _json(path, metadata, KEY_SPARSITY)
    if not isinstance(value, dict):
        raise MetadataError(f"{path}: {KEY_SPARSITY} must be a JSON object, got {type(value).__name__}")
    return value


def _version(path: str, text: Optional[str]) -> int:
    if text is None or not text.isdigit() or int(text) < 1:
        raise FormatVersionError(
            f"{path}: unknown format version {text!r} (this qat reads versions 1..{FORMAT_VERSION})"
        )
    if int(text) > FORMAT_VERSION:
        raise FormatVersionError(f"{path}: format version {text} is newer than this qat reads "
                                 f"(1..{FORMAT_VERSION}); upgrade qat to load it")
    return int(text)


def _json(path: str, metadata: dict, key: str) -> Any:
    try:
        return json.loads(metadata[key], parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise MetadataError(f"{path}: metadata '{key}' is not valid JSON ({err})") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-JSON constant {name}")


def _architecture(path: str, value: Any) -> Optional[dict]:
    if value is not None and not isinstance(value, dict):
        raise MetadataError(f"{path}: '{KEY_ARCHITECTURE}' must be a JSON object or null")
    return value


def _string_map(path: str, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise MetadataError(f"{path}: '{key}' must be a JSON object of strings")
    return value


def _layers(path: str, value: Any) -> dict[str, LayerSpec]:
    if not isinstance(value, dict):
        raise MetadataError(f"{path}: '{KEY_LAYERS}' must be a JSON object")
    try:
        return {name: LayerSpec.from_json(name, spec) for name, spec in value.items()}
    except MetadataError as err:
        raise MetadataError(f"{path}: {err}") from None


def _check_tensors(path: str, header: Header, manifest: Manifest) -> None:
    names = set(header.tensors)
    if set(manifest.checksums) != names or not all(_HEX64.fullmatch(v) for v in manifest.checksums.values()):
        raise MetadataError(f"{path}: '{KEY_CHECKSUMS}' must hold one SHA-256 hex digest per tensor")
    for alias, source in manifest.tied.items():
        if alias in names or source not in names:
            raise MetadataError(f"{path}: tied entry {alias!r} -> {source!r} must name a stored tensor")
    for layer, spec in manifest.layers.items():
        for suffix, (shape, st_dtype) in spec.tensor_shapes().items():
            name = layer_tensor(layer, suffix)
            entry = header.tensors.get(manifest.tied.get(name, name))  # a tied table is stored once
            if entry is None:
                raise TensorMismatchError(f"{path}: tensor '{name}' of layer '{layer}' is missing")
            if entry.shape != tuple(shape) or entry.st_dtype != st_dtype:
                raise TensorMismatchError(
                    f"{path}: tensor '{name}' is {entry.st_dtype}{list(entry.shape)}; the layer spec needs "
                    f"{st_dtype}{list(shape)}"
                )


def read_golden(path: str | os.PathLike) -> Optional[Golden]:
    """The golden data of a qat file (header checked first), or None when it has none."""
    return read_manifest(read_header(os.fspath(path))).golden
