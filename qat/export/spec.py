"""Per-layer quantization spec as recorded in a checkpoint's `qat.layers` metadata.

`LayerSpec.to_json()` / `LayerSpec.from_json()` are exact inverses; `from_json` checks
every field (type, range, consistency) and raises `MetadataError` naming the layer and
the field, so a reader never acts on a malformed spec.

Example:
    >>> spec = LayerSpec.from_json("fc", {"type": "Linear", "weight": {...}, "input": None, "conv": None})
    >>> spec.weight.tensor_shapes()      # {'weight_packed': (N, K // 2), 'weight_scales': (N, G)}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from qat.export.format import (
    CODES,
    FLOAT_DTYPE_NAMES,
    INPUT_SCALE,
    INPUT_ZERO,
    LAYER_TYPES,
    LAYOUT_INT4,
    LAYOUT_UINT8,
    PACKED,
    SCALE_DTYPE_TO_ST,
    SCALES,
    ZEROS,
    MetadataError,
)

MIN_BITS, MAX_BITS = 2, 8
QUANTIZER_KINDS = ("lsq", "lsq_plus", "observer")


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of the training codes q; stored codes are u = q - qmin in [0, 2^bits - 1]."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def choose_layout(bits: int, columns: int) -> str:
    """'int4' (two codes per byte) for bits <= 4 and an even column count, else 'uint8'."""
    return LAYOUT_INT4 if bits <= 4 and columns % 2 == 0 else LAYOUT_UINT8


@dataclass(frozen=True)
class WeightSpec:
    """How a layer's weight is stored.

    `shape` is the weight's shape in the float model; the stored matrix is
    (N, K) = (shape[0], prod(shape[1:])). `group_size` is the number of consecutive
    inputs of a row sharing one scale in the file (K for per-channel and per-tensor
    training granularity). Without stored zeros every group's zero is `implied_zero`.
    """

    layout: str
    bits: int
    signed: bool
    symmetric: bool
    granularity: str
    group_size: int
    scale_dtype: str
    zeros: bool
    shape: tuple
    dtype: str
    quantizer: str

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def columns(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def groups(self) -> int:
        return self.columns // self.group_size

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.signed)[0]

    @property
    def implied_zero(self) -> int:
        """The stored code of the real value 0 when no zeros are stored: -qmin."""
        return -self.qmin

    def tensor_shapes(self) -> dict[str, tuple[tuple, str]]:
        """{suffix: (shape, safetensors dtype)} of the tensors this weight is stored in."""
        n, k, g = self.rows, self.columns, self.groups
        data = (PACKED, (n, k // 2)) if self.layout == LAYOUT_INT4 else (CODES, (n, k))
        shapes = {data[0]: (data[1], "U8"), SCALES: ((n, g), SCALE_DTYPE_TO_ST[self.scale_dtype])}
        if self.zeros:
            shapes[ZEROS] = ((n, g), "U8")
        return shapes


@dataclass(frozen=True)
class InputSpec:
    """Static fake-quantization of a layer's input: scale / zero point per tensor or per channel."""

    bits: int
    signed: bool
    symmetric: bool
    granularity: str
    axis: int
    channels: int
    scale_dtype: str
    quantizer: str

    @property
    def qrange(self) -> tuple[int, int]:
        return code_range(self.bits, self.signed)

    def tensor_shapes(self) -> dict[str, tuple[tuple, str]]:
        shape = () if self.granularity == "tensor" else (self.channels,)
        return {INPUT_SCALE: (shape, SCALE_DTYPE_TO_ST[self.scale_dtype]), INPUT_ZERO: (shape, "I32")}


@dataclass(frozen=True)
class ConvSpec:
    """Conv2d hyper-parameters (checked against the rebuilt architecture at load)."""

    stride: tuple
    padding: Any  # tuple of ints, or 'same' / 'valid'
    dilation: tuple
    groups: int
    padding_mode: str


@dataclass(frozen=True)
class LayerSpec:
    """One quantized layer: its float type, weight storage, and input quantization."""

    type: str
    weight: Optional[WeightSpec]
    input: Optional[InputSpec]
    conv: Optional[ConvSpec] = None

    def tensor_shapes(self) -> dict[str, tuple[tuple, str]]:
        shapes = self.weight.tensor_shapes() if self.weight else {}
        shapes.update(self.input.tensor_shapes() if self.input else {})
        return shapes

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("weight", "input", "conv"):
            if data[key] is not None:
                data[key] = {name: list(v) if isinstance(v, tuple) else v for name, v in data[key].items()}
        return data

    @classmethod
    def from_json(cls, name: str, data: Any) -> LayerSpec:
        where = f"layer '{name}'"
        obj = _object(data, where, {"type", "weight", "input", "conv"})
        layer_type = _choice(obj, "type", LAYER_TYPES, where)
        weight = None if obj["weight"] is None else _weight_spec(obj["weight"], f"{where} weight")
        inputs = None if obj["input"] is None else _input_spec(obj["input"], f"{where} input")
        conv = None if obj["conv"] is None else _conv_spec(obj["conv"], f"{where} conv")
        if weight is None and inputs is None:
            raise MetadataError(f"{where}: neither weight nor input quantization is recorded")
        if (conv is not None) != (layer_type == "Conv2d"):
            raise MetadataError(f"{where}: 'conv' must be given exactly for Conv2d layers")
        if layer_type == "Embedding" and inputs is not None:
            raise MetadataError(f"{where}: Embedding layers take no input quantization")
        return cls(type=layer_type, weight=weight, input=inputs, conv=conv)


# ---- field checks -----------------------------------------------------------------------
def _object(data: Any, where: str, keys: set) -> dict:
    if not isinstance(data, dict):
        raise MetadataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if set(data) != keys:
        missing, extra = sorted(keys - set(data)), sorted(set(data) - keys)
        raise MetadataError(f"{where}: missing keys {missing}, unknown keys {extra}")
    return data


def _int(obj: dict, key: str, where: str, low: int, high: int) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MetadataError(f"{where}: '{key}'={value!r} is not an integer in [{low}, {high}]")
    return value


def _bool(obj: dict, key: str, where: str) -> bool:
    if not isinstance(obj[key], bool):
        raise MetadataError(f"{where}: '{key}'={obj[key]!r} is not a boolean")
    return obj[key]


def _choice(obj: dict, key: str, allowed: tuple, where: str) -> str:
    if not isinstance(obj[key], str) or obj[key] not in allowed:
        raise MetadataError(f"{where}: '{key}'={obj[key]!r} is not one of {', '.join(allowed)}")
    return obj[key]


def _int_list(obj: dict, key: str, where: str, length: Optional[int] = None, low: int = 0) -> tuple:
    value = obj[key]
    ok = isinstance(value, list) and (length is None or len(value) == length)
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value):
        size = f"{length} " if length else ""
        raise MetadataError(f"{where}: '{key}'={value!r} is not a list of {size}integers >= {low}")
    return tuple(value)


WEIGHT_KEYS = {"layout", "bits", "signed", "symmetric", "granularity", "group_size", "scale_dtype", "zeros",
               "shape", "dtype", "quantizer"}


def _weight_spec(data: Any, where: str) -> WeightSpec:
    obj = _object(data, where, WEIGHT_KEYS)
    shape = _int_list(obj, "shape", where, low=1)
    if len(shape) < 2 or math.prod(shape) > 2**40:
        raise MetadataError(f"{where}: 'shape'={list(shape)} must have 2+ dimensions and at most 2^40 elements")
    spec = WeightSpec(
        layout=_choice(obj, "layout", (LAYOUT_INT4, LAYOUT_UINT8), where),
        bits=_int(obj, "bits", where, MIN_BITS, MAX_BITS),
        signed=_bool(obj, "signed", where),
        symmetric=_bool(obj, "symmetric", where),
        granularity=_choice(obj, "granularity", ("tensor", "channel", "group"), where),
        group_size=_int(obj, "group_size", where, 1, 2**40),
        scale_dtype=_choice(obj, "scale_dtype", tuple(SCALE_DTYPE_TO_ST), where),
        zeros=_bool(obj, "zeros", where),
        shape=shape,
        dtype=_choice(obj, "dtype", tuple(FLOAT_DTYPE_NAMES), where),
        quantizer=_choice(obj, "quantizer", QUANTIZER_KINDS, where),
    )
    if spec.columns % spec.group_size:
        raise MetadataError(f"{where}: group_size {spec.group_size} does not divide {spec.columns} columns")
    if spec.granularity != "group" and spec.group_size != spec.columns:
        raise MetadataError(f"{where}: {spec.granularity} granularity needs group_size == {spec.columns}")
    if spec.layout != choose_layout(spec.bits, spec.columns):
        raise MetadataError(f"{where}: layout {spec.layout!r} is not the one defined for "
                            f"{spec.bits} bits and {spec.columns} columns")
    if not spec.zeros and not spec.symmetric:
        raise MetadataError(f"{where}: asymmetric layers must store zeros")
    return spec


INPUT_KEYS = {"bits", "signed", "symmetric", "granularity", "axis", "channels", "scale_dtype", "quantizer"}


def _input_spec(data: Any, where: str) -> InputSpec:
    obj = _object(data, where, INPUT_KEYS)
    spec = InputSpec(
        bits=_int(obj, "bits", where, MIN_BITS, MAX_BITS),
        signed=_bool(obj, "signed", where),
        symmetric=_bool(obj, "symmetric", where),
        granularity=_choice(obj, "granularity", ("tensor", "channel"), where),
        axis=_int(obj, "axis", where, -8, 8),
        channels=_int(obj, "channels", where, 0, 2**40),
        scale_dtype=_choice(obj, "scale_dtype", tuple(SCALE_DTYPE_TO_ST), where),
        quantizer=_choice(obj, "quantizer", QUANTIZER_KINDS, where),
    )
    if (spec.granularity == "channel") != (spec.channels > 0):
        raise MetadataError(f"{where}: 'channels' must be > 0 exactly for channel granularity")
    return spec


def _conv_spec(data: Any, where: str) -> ConvSpec:
    obj = _object(data, where, {"stride", "padding", "dilation", "groups", "padding_mode"})
    padding = obj["padding"]
    if not (isinstance(padding, str) and padding in ("same", "valid")):
        padding = _int_list(obj, "padding", where, 2)
    return ConvSpec(
        stride=_int_list(obj, "stride", where, 2, low=1),
        padding=padding,
        dilation=_int_list(obj, "dilation", where, 2, low=1),
        groups=_int(obj, "groups", where, 1, 2**40),
        padding_mode=_choice(obj, "padding_mode", ("zeros", "reflect", "replicate", "circular"), where),
    )
