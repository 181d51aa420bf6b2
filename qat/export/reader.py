"""Reading safetensors files without trusting them, and without pickle.

`read_header` checks the container before any tensor byte is used: the 8-byte header
length, the JSON header (strict UTF-8, no duplicate keys, no NaN), every entry's dtype,
shape and offsets (sorted, contiguous, covering the data exactly), and it recognizes
pickle and torch.save zip files by their first bytes. `read_tensors` then reads each
tensor straight into its own buffer (one copy: peak memory stays near the file size),
checks its SHA-256, and hands it over; nothing is deserialized except numbers.

Example:
    >>> header = read_header("model.safetensors")
    >>> for name, tensor in read_tensors(header, checksums): ...
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from qat.export.format import (
    MAX_HEADER_BYTES,
    ST_TO_TORCH,
    HeaderError,
    IntegrityError,
    NotSafetensorsError,
    TruncatedError,
)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: its dtype, shape and byte range inside the data section."""

    name: str
    st_dtype: str
    shape: tuple
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return ST_TO_TORCH[self.st_dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """A validated safetensors header: metadata and tensor entries in file order."""

    path: str
    file_size: int
    header_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def sniff(first: bytes) -> Optional[str]:
    """A name for well-known non-safetensors files, from their first bytes."""
    if first.startswith(b"PK\x03\x04"):
        return "a zip archive (the torch.save format, which unpickles on load)"
    if len(first) >= 2 and first[0] == 0x80 and 2 <= first[1] <= 5:
        return f"a pickle (protocol {first[1]})"
    if first.startswith((b"\x1f\x8b", b"\x89HDF", b"\x93NUMPY")):
        return "a gzip, HDF5 or numpy file"
    return None


def read_header(path: str | os.PathLike) -> Header:
    """Open `path` and validate its safetensors header; raises a `CheckpointError` subclass."""
    path = os.fspath(path)
    with open(path, "rb") as handle:  # OS errors (missing file, no permission) propagate as they are
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(min(size, 8))
        if (kind := sniff(prefix)) is not None:
            raise NotSafetensorsError(f"{path}: this is {kind}, not safetensors; qat never unpickles files")
        if size < 8:
            raise TruncatedError(f"{path}: {size} byte(s) is too short for a safetensors file (needs 8+)")
        header_size = int.from_bytes(prefix, "little")
        raw = _read_header_bytes(handle, path, size, header_size)
    header = Header(path=path, file_size=size, header_size=header_size)
    _parse_entries(header, _parse_json(path, raw))
    return header


def _read_header_bytes(handle: Any, path: str, size: int, header_size: int) -> bytes:
    if header_size > MAX_HEADER_BYTES or header_size < 2:
        raise NotSafetensorsError(
            f"{path}: not a safetensors file (its first 8 bytes give a header length of {header_size}, "
            f"outside 2..{MAX_HEADER_BYTES})"
        )
    raw = handle.read(header_size)
    if raw[:1] not in (b"{", b""):
        raise NotSafetensorsError(f"{path}: not a safetensors file (the header does not start with '{{')")
    if 8 + header_size > size:
        raise TruncatedError(
            f"{path}: the file ends inside the header (header length {header_size} bytes, file {size} bytes); "
            "the file is truncated or its first 8 bytes are corrupted"
        )
    return raw


def _parse_json(path: str, raw: bytes) -> dict:
    def no_duplicates(pairs: list) -> dict:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise HeaderError(f"{path}: the header repeats a key")
        return dict(pairs)

    def no_constants(name: str) -> None:
        raise HeaderError(f"{path}: the header holds the non-JSON constant {name}")

    try:
        text = raw.decode("utf-8")
        data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        if isinstance(err, HeaderError):
            raise
        raise HeaderError(f"{path}: the header is not valid UTF-8 JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise HeaderError(f"{path}: the header is a JSON {type(data).__name__}, not an object")
    return data


def _parse_entries(header: Header, data: dict) -> None:
    path = header.path
    metadata = data.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"{path}: '__metadata__' must map strings to strings")
    header.metadata = metadata
    entries = sorted((_entry(path, name, value) for name, value in data.items()), key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            raise HeaderError(f"{path}: tensor '{entry.name}' starts at byte {entry.begin} of the data, expected "
                              f"{position} (tensors must be contiguous and must not overlap)")
        position = entry.end
    available = header.file_size - header.data_start
    if position > available:
        raise TruncatedError(f"{path}: the tensor data needs {position} bytes but the file holds {available} "
                             "after the header; the file is truncated")
    if position < available:
        raise HeaderError(f"{path}: {available - position} byte(s) after the last tensor belong to no tensor")
    header.tensors = {entry.name: entry for entry in entries}


def _entry(path: str, name: str, value: Any) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"{where}: entry must have exactly 'dtype', 'shape' and 'data_offsets'")
    st_dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if st_dtype not in ST_TO_TORCH:
        raise HeaderError(f"{where}: unsupported dtype {st_dtype!r}; supported: {', '.join(ST_TO_TORCH)}")
    if not isinstance(shape, list) or not all(_natural(v) for v in shape):
        raise HeaderError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(v) for v in offsets)):
        raise HeaderError(f"{where}: data_offsets {offsets!r} is not two non-negative integers")
    begin, end = offsets
    expected = math.prod(shape) * ST_TO_TORCH[st_dtype].itemsize
    if end - begin != expected:
        raise HeaderError(f"{where}: data_offsets span {end - begin} bytes but dtype {st_dtype} and shape "
                          f"{shape} need {expected}")
    return TensorEntry(name=name, st_dtype=st_dtype, shape=tuple(shape), begin=begin, end=end)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensors(
    header: Header, checksums: dict[str, str], names: Optional[set] = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) in file order, each read once and checked against its SHA-256.

    Raises `IntegrityError` naming the tensor on a checksum mismatch and `TruncatedError`
    when the file shrank since its header was read.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("reading safetensors (little-endian) on a big-endian machine is not supported")
    with open(header.path, "rb") as handle:
        for entry in header.tensors.values():
            if names is not None and entry.name not in names:
                continue
            raw = torch.empty(entry.nbytes, dtype=torch.uint8)
            handle.seek(header.data_start + entry.begin)
            if entry.nbytes and handle.readinto(memoryview(raw.numpy())) != entry.nbytes:
                raise TruncatedError(f"{header.path}: the file ended while reading tensor '{entry.name}'")
            digest = hashlib.sha256(raw.numpy()).hexdigest()
            if digest != checksums.get(entry.name):
                raise IntegrityError(f"{header.path}: tensor '{entry.name}' fails its SHA-256 check "
                                     "(the payload was altered or corrupted)")
            yield entry.name, raw.view(entry.dtype).reshape(entry.shape)
