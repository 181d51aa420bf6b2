"""Typed quantization settings.

These dataclasses are the one description of "how to quantize" used everywhere:
`prepare()` reads them, recipes load into them (they work as omegaconf structured
configs), and export records them. Every invalid value raises `ConfigError` naming
the field and the values it accepts.

Example:
    >>> spec = QuantSpec(weight=QuantizerConfig(bits=4, group_size=64),
    ...                  rules=[QuantRule(name="lm_head", skip=True)])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch

from qat.errors import ConfigError
from qat.functional import SCALE_DTYPES

GRANULARITIES = ("tensor", "channel", "group")
QUANTIZERS = ("lsq", "lsq_plus", "observer")
INITS = ("minmax", "percentile", "mse")
SCALE_DTYPE_NAMES = ("float16", "bfloat16", "float32")
SUPPORTED_TYPES = ("Linear", "Conv2d", "Embedding", "QuantPoint")
MIN_BITS, MAX_BITS = 2, 8
MIN_GROUP, MAX_GROUP = 16, 256
GROUP_FALLBACKS = ("divisor", "skip")


def _check_choice(owner: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{owner}.{name}={value!r} is not valid; allowed: {choices}")


def _check_bits(owner: str, name: str, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{owner}.{name}={bits!r} is not valid; allowed: integers {MIN_BITS}..{MAX_BITS}")


def _check_bool(owner: str, name: str, value: object, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (optional and value is None):
        allowed = "true, false or null" if optional else "true or false"
        raise ConfigError(f"{owner}.{name}={value!r} is not valid; allowed: {allowed}")


def _check_interval(owner: str, name: str, value: object, lo: float, hi: float, closed_low: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and (lo <= value < hi if closed_low else lo < value <= hi)
    if not inside:
        interval = f"[{lo:g}, {hi:g})" if closed_low else f"({lo:g}, {hi:g}]"
        raise ConfigError(f"{owner}.{name}={value!r} is not valid; allowed: {interval}")


def _check_group_size(owner: str, group_size: int) -> None:
    ok = isinstance(group_size, int) and MIN_GROUP <= group_size <= MAX_GROUP
    if not ok or group_size & (group_size - 1):
        raise ConfigError(
            f"{owner}.group_size={group_size!r} is not valid; allowed: powers of two "
            f"{MIN_GROUP}..{MAX_GROUP} (use granularity='channel' for one group per row)"
        )


@dataclass
class QuantizerConfig:
    """How one tensor (a weight or an activation) is fake-quantized (the LSQ / LSQ+ gradients: `qat.ste`).
    The defaults are 4-bit symmetric LSQ weights, groups of 128, MSE range init."""

    bits: int = 4
    """Code width in bits, 2..8."""
    symmetric: bool = True
    """Zero point fixed at 0 (True) or a zero point per scale (False)."""
    signed: Optional[bool] = None
    """Signed codes [-2^(b-1), 2^(b-1)-1] (True) or unsigned [0, 2^b-1] (False); None picks signed for
    symmetric and unsigned for asymmetric."""
    granularity: str = "group"
    """'tensor' (one scale), 'channel' (one per output channel; for activations one per feature) or
    'group' (one per `group_size` consecutive inputs of each output row)."""
    group_size: int = 128
    """Inputs per scale with granularity='group': a power of two 16..256 (unused otherwise). A layer whose
    input dimension it does not divide is handled by `QuantSpec.group_fallback`."""
    quantizer: str = "lsq"
    """'lsq' (learnable scale), 'lsq_plus' (learnable scale and zero point; needs symmetric=False) or
    'observer' (scale and zero point follow an observer at every training step, nothing learned)."""
    init: str = "mse"
    """Range initialization: 'minmax', 'percentile' (see `percentile`) or 'mse' (clipping search: of the
    min-max range shrunk by 64 ratios from 1.0 to 0.2, the one with the smallest fake-quant squared error,
    per scale)."""
    percentile: float = 99.99
    """The percentile used by init='percentile' (the range runs from the (100 - p)-th to the p-th), in
    (50, 100]."""
    ema_decay: float = 0.0
    """How calibration batches combine: 0 keeps the running min/max ('minmax') or the running mean of the
    batches' ranges ('percentile', 'mse'); in (0, 1) an exponential moving average with this decay."""
    scale_dtype: str = "float16"
    """The dtype scales are rounded to during training and stored in at export: 'float16' (4.125 bits per
    weight at group size 128), 'bfloat16' or 'float32'."""

    def __post_init__(self) -> None:
        owner = "QuantizerConfig"
        _check_choice(owner, "scale_dtype", self.scale_dtype, SCALE_DTYPE_NAMES)
        _check_bits(owner, "bits", self.bits)
        _check_bool(owner, "symmetric", self.symmetric)
        _check_bool(owner, "signed", self.signed, optional=True)
        _check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        _check_choice(owner, "quantizer", self.quantizer, QUANTIZERS)
        _check_choice(owner, "init", self.init, INITS)
        if self.granularity == "group":
            _check_group_size(owner, self.group_size)
        _check_interval(owner, "percentile", self.percentile, 50, 100, closed_low=False)
        _check_interval(owner, "ema_decay", self.ema_decay, 0, 1, closed_low=True)
        if self.quantizer == "lsq_plus" and self.symmetric:
            raise ConfigError(
                f"{owner}.quantizer='lsq_plus' learns a zero point and needs symmetric=False"
            )

    @property
    def is_signed(self) -> bool:
        """Whether codes are signed (the `signed` field, or its default)."""
        return self.symmetric if self.signed is None else self.signed

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.is_signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.is_signed else 2**self.bits - 1


def default_weight_config() -> QuantizerConfig:
    """4-bit symmetric LSQ weights, groups of 128 inputs, MSE range init."""
    return QuantizerConfig()


def default_activation_config(bits: int = 8) -> QuantizerConfig:
    """Asymmetric per-tensor LSQ+ activations with min-max range init."""
    return QuantizerConfig(
        bits=bits, symmetric=False, granularity="tensor", quantizer="lsq_plus", init="minmax", scale_dtype="float32"
    )


@dataclass
class QuantRule:
    """Override the default setting for the layers it matches.

    A rule matches a layer when `name` and `type` both match; a missing one matches everything
    (a rule needs at least one). Fields left at None change nothing. A weight field set on a layer
    without weight quantization starts from the default weight setting (`default_weight_config`),
    an activation field on one without activation quantization from the default activation setting
    (`default_activation_config`).

    Example:
        >>> QuantRule(name=r"lm_head", skip=True)
        >>> QuantRule(type="Conv2d", bits=8, granularity="channel")
    """

    name: Optional[str] = None
    """A regular expression, matched against the whole qualified module name; None: every name."""
    type: Optional[str] = None
    """A class name: 'Linear', 'Conv2d', 'Embedding' (subclasses match their base) or 'QuantPoint' (a marked
    tensor, qat.points: activation fields only); None: every type."""
    skip: Optional[bool] = None
    """True keeps the matched layers float; False undoes an earlier rule's skip."""
    bits: Optional[int] = None
    """Weight bits, 2..8."""
    group_size: Optional[int] = None
    """Weight group size, a power of two 16..256."""
    granularity: Optional[str] = None
    """Weight granularity: 'tensor', 'channel' or 'group'."""
    symmetric: Optional[bool] = None
    """Weight zero point fixed at 0 (True) or per scale (False)."""
    activation_bits: Optional[int] = None
    """Input-activation bits, 2..8 (turns activation quantization on where it is off)."""
    quantize_activations: Optional[bool] = None
    """True turns input-activation quantization on (the default activation setting, 8-bit, where it is
    off); False turns it off, whatever `activation_bits` says. Embedding inputs are ids: never quantized."""

    def __post_init__(self) -> None:
        owner = "QuantRule"
        if self.name is None and self.type is None:
            raise ConfigError(f"{owner} needs `name` (a regex) or `type` ({', '.join(SUPPORTED_TYPES)})")
        for flag in ("skip", "symmetric", "quantize_activations"):
            _check_bool(owner, flag, getattr(self, flag), optional=True)
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError(f"{owner}.name={self.name!r} is not valid; allowed: a regular expression string")
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as err:
                raise ConfigError(f"{owner}.name={self.name!r} is not a valid regex: {err}") from None
        if self.type is not None:
            _check_choice(owner, "type", self.type, SUPPORTED_TYPES)
        if self.bits is not None:
            _check_bits(owner, "bits", self.bits)
        if self.activation_bits is not None:
            _check_bits(owner, "activation_bits", self.activation_bits)
        if self.granularity is not None:
            _check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        if self.group_size is not None:
            _check_group_size(owner, self.group_size)

    def matches(self, name: str, type_name: str) -> bool:
        """True when this rule applies to module `name` of class `type_name`."""
        if self.type is not None and self.type != type_name:
            return False
        return self.name is None or re.fullmatch(self.name, name) is not None

    def describe(self) -> str:
        parts = [f"name={self.name!r}"] if self.name is not None else []
        if self.type is not None:
            parts.append(f"type={self.type}")
        return "rule(" + ", ".join(parts) + ")"


@dataclass
class LayerConfig:
    """The resolved setting of one layer: weight and input-activation quantizers."""

    weight: Optional[QuantizerConfig]
    """The weight quantizer's setting; None: the weight stays float."""
    activation: Optional[QuantizerConfig]
    """The input-activation quantizer's setting; None: the inputs stay float."""


@dataclass
class QuantSpec:
    """What `prepare()` does to a model (Linear, Conv2d and Embedding layers): a default setting plus
    ordered rules.

    Example:
        >>> QuantSpec(activation=default_activation_config(8),
        ...           rules=[QuantRule(name="features\\\\.0", skip=True)])
    """

    weight: Optional[QuantizerConfig] = field(default_factory=default_weight_config)
    """The default weight setting (4-bit symmetric LSQ, groups of 128, MSE range init); None: weights stay
    float unless a rule sets a weight field."""
    activation: Optional[QuantizerConfig] = None
    """The default input-activation setting (Linear and Conv2d; Embedding inputs are ids); None:
    activations stay float unless a rule turns them on."""
    rules: List[QuantRule] = field(default_factory=list)
    """Per-layer overrides, applied in order; each matching rule overrides the fields it sets, so a later
    rule wins over an earlier one."""
    strict: bool = False
    """True: a weight group size that does not divide a layer's input dimension is an error
    (`GroupSizeError`) instead of a case for `group_fallback`."""
    group_fallback: str = "divisor"
    """When a weight's group size does not divide a layer's input dimension (SmolLM2's 576 with groups
    of 128): 'divisor' uses the largest power-of-two group size (>= 16) below it that divides the
    dimension, and the report says so (no such size: the layer stays float); 'skip' keeps the layer in
    float, with the reason in the report."""
    fold_batchnorm: bool = False
    """True: each quantized Conv2d directly followed by a BatchNorm2d in an nn.Sequential folds it
    (qat.conv_bn): the folded weight W * gamma / sqrt(var + eps) is what is quantized and exported, with the
    folded bias; the file has no BatchNorm. False: BatchNorm stays a float layer after the quantized conv."""
    integer_bias: bool = False
    """True: a quantized Linear / Conv2d (per-channel or per-tensor weights) whose input is quantized (its own
    input quantizer, or a QuantPoint just before it) adds its bias rounded to the grid input scale x weight
    scale[c], as an integer runtime does (int32 bias: ONNX QLinearConv / QGemm), in training and in the file;
    False: a float bias."""
    max_float_fraction: float = 0.05
    """`prepare` warns loudly when more than this share of the weights of quantizable layers stays float
    because a group size does not divide the input dimension (either `group_fallback`); in [0, 1)."""

    def __post_init__(self) -> None:
        _check_choice("QuantSpec", "group_fallback", self.group_fallback, GROUP_FALLBACKS)
        _check_interval("QuantSpec", "max_float_fraction", self.max_float_fraction, 0, 1, closed_low=True)

    def resolve(self, name: str, type_name: str) -> tuple[Optional[LayerConfig], list[str]]:
        """The setting for one layer (None when skipped) and the rules that matched it."""
        weight, activation, skip = self.weight, self.activation, False
        matched = []
        for rule in self.rules:
            if not rule.matches(name, type_name):
                continue
            matched.append(rule.describe())
            skip = rule.skip if rule.skip is not None else skip
            weight = _override_weight(weight, rule)
            activation = _override_activation(activation, rule)
        if skip or (weight is None and activation is None):
            return None, matched
        return LayerConfig(weight=weight, activation=activation), matched


def _override_weight(weight: Optional[QuantizerConfig], rule: QuantRule) -> Optional[QuantizerConfig]:
    changes = {
        key: getattr(rule, key)
        for key in ("bits", "group_size", "granularity", "symmetric")
        if getattr(rule, key) is not None
    }
    if not changes:
        return weight
    base = weight if weight is not None else default_weight_config()
    return replace(base, **changes)


def _override_activation(
    activation: Optional[QuantizerConfig], rule: QuantRule
) -> Optional[QuantizerConfig]:
    if rule.quantize_activations is False:
        return None
    if rule.activation_bits is None and not rule.quantize_activations:
        return activation
    base = activation if activation is not None else default_activation_config()
    bits = rule.activation_bits if rule.activation_bits is not None else base.bits
    return replace(base, bits=bits)
