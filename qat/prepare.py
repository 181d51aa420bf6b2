"""`prepare(model, spec)`: swap supported layers for quantized ones, and say what happened.

Example:
    >>> spec = QuantSpec(rules=[QuantRule(name="lm_head", skip=True)])
    >>> model, report = prepare(model, spec)
    >>> print(report)          # one line per layer: quantized with which setting, or skipped and why
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from qat.config import LayerConfig, QuantizerConfig, QuantSpec
from qat.functional import check_finite
from qat.modules import QUANT_MODULES, QuantModule


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
            return f"{self.name:<32} {self.type:<10} quantized  {_describe(self.config)}"
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
    if not name or isinstance(module, _FLOAT_BY_DESIGN) or any(True for _ in module.children()):
        return False
    return any(True for _ in module.parameters(recurse=False))


def _input_size(module: nn.Module) -> int:
    return module.weight[0].numel()


def _check_groups(name: str, module: nn.Module, config: LayerConfig) -> Optional[str]:
    """The reason the weight's group size cannot apply to this layer, or None."""
    weight = config.weight
    if weight is None or weight.granularity != "group":
        return None
    inputs = _input_size(module)
    if inputs % weight.group_size:
        return f"group_size {weight.group_size} does not divide input dimension {inputs}"
    return None


def prepare(model: nn.Module, spec: Optional[QuantSpec] = None) -> tuple[nn.Module, PrepareReport]:
    """Swap every supported layer of `model` (in place) for its quantized version.

    Linear, Conv2d and Embedding layers are swapped with the setting `spec` resolves
    for them; leaf layers of other kinds that hold parameters are listed as
    "unsupported". Raises `GroupSizeError` in strict mode when a group size does not
    divide a layer, `NonFiniteError` for NaN/inf weights, and `ValueError` for a model
    that is already prepared. Returns the model and a `PrepareReport`.
    """
    spec = spec if spec is not None else QuantSpec()
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("model is already prepared (it contains quantized layers); call qat.unprepare first")
    report = PrepareReport()
    swaps = []
    for name, module in model.named_modules():
        kind = type(module)
        if kind not in QUANT_MODULES:
            if _worth_reporting(name, module):
                report.layers.append(LayerReport(name, kind.__name__, "unsupported", "no quantized version"))
            continue
        config, rules = spec.resolve(name, kind.__name__)
        if kind is nn.Embedding and config is not None:  # its input is ids: only the table is quantized
            config = LayerConfig(weight=config.weight, activation=None) if config.weight is not None else None
        entry = LayerReport(name, kind.__name__, "skipped", rules=rules)
        if config is None:
            entry.reason = f"skipped by {rules[-1]}" if rules else "no weight or activation quantization set"
        elif (problem := _check_groups(name, module, config)) is not None:
            if spec.strict:
                raise GroupSizeError(f"layer '{name}': {problem} (strict mode; set strict=false to skip it)")
            entry.reason = problem
        else:
            check_finite(module.weight, f"layer '{name}' weight")
            entry.action, entry.config = "quantized", config
            swaps.append((name, module, config))
        report.layers.append(entry)
    for name, module, config in swaps:
        _set_submodule(model, name, QUANT_MODULES[type(module)].from_float(module, config))
    return model, report


def unprepare(model: nn.Module, fold: bool = False) -> nn.Module:
    """Swap quantized layers back to float ones (in place); `fold` keeps the quantized weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantModule):
            _set_submodule(model, name, module.to_float(fold=fold))
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("the model is a single layer; wrap it in a container (e.g. nn.Sequential) to prepare it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
