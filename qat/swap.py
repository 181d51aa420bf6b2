"""`prepare(model, spec)`: swap supported layers for quantized ones, and say what happened.

Example:
    >>> spec = QuantSpec(rules=[QuantRule(name="lm_head", skip=True)])
    >>> model, report = prepare(model, spec)
    >>> print(report)          # one line per layer: quantized with which setting, or skipped and why
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

from torch import nn

from qat.config import MIN_GROUP, ConfigError, LayerConfig, QuantizerConfig, QuantSpec
from qat.conv_bn import FoldedBatchNorm2d, QuantConvBn2d, conv_bn_pairs
from qat.functional import check_finite
from qat.modules import QUANT_MODULES, QuantModule
from qat.points import QuantPoint


class GroupSizeError(ValueError):
    """A group size does not divide a layer's input dimension (strict mode)."""


@dataclass
class LayerReport:
    """What prepare did with one layer."""

    name: str
    type: str
    action: str  # "quantized" | "skipped" | "unsupported"
    reason: str = ""
    config: Optional[LayerConfig] = None
    rules: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.action == "quantized":
            note = f"  ({self.reason})" if self.reason else ""
            return f"{self.name:<32} {self.type:<10} quantized  {_describe(self.config)}{note}"
        return f"{self.name:<32} {self.type:<10} {self.action:<10} {self.reason}"


@dataclass
class PrepareReport:
    """Per-layer outcome of `prepare`, in module order."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action == "quantized"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action != "quantized"]

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        head = f"prepare: {len(self.quantized)} layer(s) quantized, {len(self.skipped)} not"
        return "\n".join([head, *(layer.line() for layer in self.layers)])


def _describe(config: Optional[LayerConfig]) -> str:
    def one(q: Optional[QuantizerConfig]) -> str:
        if q is None:
            return "float"
        group = f"/g{q.group_size}" if q.granularity == "group" else f"/{q.granularity}"
        return f"{q.quantizer} {'' if q.symmetric else 'a'}sym int{q.bits}{group}"

    return "-" if config is None else f"W: {one(config.weight)}  A: {one(config.activation)}"


# Layers that are kept in float by design (not reported as unsupported).
_FLOAT_BY_DESIGN = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _worth_reporting(name: str, module: nn.Module) -> bool:
    """A parameter-holding leaf layer that qat cannot quantize (norm layers stay float by design)."""
    if not name or isinstance(module, _FLOAT_BY_DESIGN) or type(module).__name__.endswith("Norm"):
        return False  # norm layers (torch's and libraries' own, e.g. LlamaRMSNorm) stay float by design
    if any(True for _ in module.children()):
        return False
    return any(True for _ in module.parameters(recurse=False))


def _input_size(module: nn.Module) -> int:
    return module.weight[0].numel()


def quantizable_base(module: nn.Module) -> Optional[type[nn.Module]]:
    """The float class (Linear, Conv2d, Embedding, QuantPoint) `module` is an instance of, or None.

    Subclasses count (a library's own Linear subclass is quantized as a Linear); layers
    that are already quantized do not."""
    if isinstance(module, QuantModule):
        return None
    return next((base for base in QUANT_MODULES if isinstance(module, base)), None)


def _fit_groups(name: str, module: nn.Module, config: LayerConfig, spec: QuantSpec,
                ) -> tuple[Optional[LayerConfig], str]:
    """(config, note) for a layer whose input dimension the weight's group size does not divide: the
    largest power-of-two divisor >= 16 (group_fallback='divisor'), or (None, reason): stays float."""
    weight = config.weight
    if weight is None or weight.granularity != "group":
        return config, ""
    inputs = _input_size(module)
    if inputs % weight.group_size == 0:
        return config, ""
    problem = f"group_size {weight.group_size} does not divide input dimension {inputs}"
    if spec.strict:
        raise GroupSizeError(f"layer '{name}': {problem} (strict mode; set strict=false to skip it)")
    divisor = next((g for g in _powers_of_two_below(weight.group_size) if inputs % g == 0), None)
    if spec.group_fallback == "skip" or divisor is None:
        return None, problem
    fitted = LayerConfig(weight=replace(weight, group_size=divisor), activation=config.activation)
    return fitted, f"group_size {divisor}: {problem}"


def _powers_of_two_below(group_size: int) -> list[int]:
    sizes, size = [], group_size // 2
    while size >= MIN_GROUP:
        sizes.append(size)
        size //= 2
    return sizes


# (name, float module, its base class, the config it gets or None when it stays float)
Plan = list[tuple[str, nn.Module, type[nn.Module], Optional[LayerConfig]]]


def prepare(model: nn.Module, spec: Optional[QuantSpec] = None) -> tuple[nn.Module, PrepareReport]:
    """Swap every supported layer of `model` (in place) for its quantized version.

    Linear, Conv2d and Embedding layers (subclasses included) are swapped with the setting
    `spec` resolves for them; leaf layers of other kinds that hold parameters are listed as
    "unsupported". Layers sharing one weight (a tied embedding and output head) get one
    quantizer, so they quantize the table identically and export stores it once. Scales live
    on the weight's device. Raises `GroupSizeError` in strict mode when a group size does not
    divide a layer, `NonFiniteError` for NaN/inf weights, `ConfigError` when tied layers
    resolve to different settings, and `ValueError` for a model that is already prepared.
    Returns the model and a `PrepareReport`.
    """
    spec = spec if spec is not None else QuantSpec()
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("model is already prepared (it contains quantized layers); call qat.unprepare first")
    report, plan = PrepareReport(), []
    for name, module in model.named_modules(remove_duplicate=False):
        base = quantizable_base(module)
        if base is None:
            if _worth_reporting(name, module):
                report.layers.append(LayerReport(name, type(module).__name__, "unsupported", "no quantized version"))
            continue
        entry, config = _plan_layer(name, module, base, spec)
        plan.append((name, module, base, config))
        report.layers.append(entry)
    check_tied(plan, report)
    pairs = conv_bn_pairs(model) if spec.fold_batchnorm else {}
    quantized: dict[int, QuantModule] = {}
    for name, module, base, config in plan:
        if config is None:
            continue
        if name in pairs and config.weight is not None:
            bn = FoldedBatchNorm2d.from_batchnorm(model.get_submodule(pairs[name]))
            _set_submodule(model, pairs[name], bn)
            qmodule = QuantConvBn2d.from_conv_bn(module, bn, config)
            report[name].reason = "; ".join(filter(None, [report[name].reason, f"{pairs[name]} folded in"]))
        else:
            qmodule = QUANT_MODULES[base].from_float(module, config)
        qmodule.integer_bias = spec.integer_bias and base is not QuantPoint
        first = quantized.setdefault(id(getattr(module, "weight", qmodule)), qmodule)
        if first is not qmodule and qmodule.weight_quantizer is not None:
            qmodule.weight_quantizer = first.weight_quantizer  # one quantizer for a tied table
        _set_submodule(model, name, qmodule)
    warn_float_fraction(plan, report, spec)
    return model, report


def _plan_layer(name: str, module: nn.Module, base: type[nn.Module], spec: QuantSpec,
                ) -> tuple[LayerReport, Optional[LayerConfig]]:
    """The report entry of one quantizable layer and the config it will be swapped with (None: stays float)."""
    config, rules = spec.resolve(name, base.__name__)
    if base is nn.Embedding and config is not None:  # its input is ids: only the table is quantized
        config = LayerConfig(weight=config.weight, activation=None) if config.weight is not None else None
    if base is QuantPoint and config is not None:  # no weight: only the tensor passing through is quantized
        config = LayerConfig(weight=None, activation=config.activation) if config.activation is not None else None
    entry = LayerReport(name, base.__name__, "skipped", rules=rules)
    if config is None:
        entry.reason = f"skipped by {rules[-1]}" if rules else "no weight or activation quantization set"
        return entry, None
    config, note = _fit_groups(name, module, config, spec)
    if config is None:
        entry.reason = note
        return entry, None
    if base is not QuantPoint:
        check_finite(module.weight, f"layer '{name}' weight")
    if base is QuantPoint and module.fixed_range is not None:
        note = "; ".join(filter(None, [note, f"fixed range [{module.fixed_range[0]:g}, {module.fixed_range[1]:g}]"]))
    entry.action, entry.config, entry.reason = "quantized", config, note
    return entry, config


def check_tied(plan: Plan, report: PrepareReport) -> None:
    """Layers sharing one weight must resolve to one weight setting (all quantized alike, or all float)."""
    groups: dict[int, list[tuple[str, Optional[LayerConfig]]]] = {}
    for name, module, base, config in plan:
        if base is not QuantPoint:
            groups.setdefault(id(module.weight), []).append((name, config))
    for members in groups.values():
        if len(members) < 2:
            continue
        weights = {name: config.weight if config is not None else None for name, config in members}
        if len({repr(w) for w in weights.values()}) > 1:
            detail = "; ".join(f"{name}: {_describe_weight(w)}" for name, w in weights.items())
            raise ConfigError(f"layers {', '.join(weights)} share one weight (tied) but resolve to different "
                              f"weight settings ({detail}); give them one setting with a rule matching all of "
                              f"them, e.g. name: '{'|'.join(weights)}'")
        first = members[0][0]
        for name, config in members[1:]:
            if config is not None:
                report[name].reason = f"tied to {first}: shares its weight and quantizer"


def _describe_weight(weight: Optional[QuantizerConfig]) -> str:
    return "float" if weight is None else _describe(LayerConfig(weight=weight, activation=None)).split("  ")[0][3:]


def warn_float_fraction(plan: Plan, report: PrepareReport, spec: QuantSpec) -> None:
    """Warn loudly when group sizes that do not divide layers keep more than `max_float_fraction` of the
    weights of quantizable layers in float."""
    sizes = {name: module.weight.numel() for name, module, base, _ in plan if base is not QuantPoint}
    kept = sum(sizes.get(layer.name, 0) for layer in report.skipped if "does not divide" in layer.reason)
    total = sum(sizes.values())
    if total and kept / total > spec.max_float_fraction:
        warnings.warn(f"prepare: {kept / total:.1%} of the weights of quantizable layers stay float because their "
                      f"group size does not divide the input dimension (limit {spec.max_float_fraction:.0%}); use "
                      "group_fallback='divisor', a smaller group_size or a rule for those layers", stacklevel=3)


def unprepare(model: nn.Module, fold: bool = False) -> nn.Module:
    """Swap quantized layers back to float ones (in place); `fold` keeps the quantized weights. A folded
    BatchNorm (QuantSpec.fold_batchnorm) becomes a BatchNorm2d again, or with `fold`, nn.Identity after a
    conv holding the quantized folded weight and bias."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantConvBn2d) and fold:
            _set_submodule(model, name, module.folded_float())
        elif isinstance(module, QuantModule):
            _set_submodule(model, name, module.to_float(fold=fold))
    for name, module in list(model.named_modules()):
        if isinstance(module, FoldedBatchNorm2d):
            _set_submodule(model, name, nn.Identity() if fold else module.to_batchnorm())
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("the model is a single layer; wrap it in a container (e.g. nn.Sequential) to prepare it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
