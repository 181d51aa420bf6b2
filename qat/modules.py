"""Quantized layers: float layers whose weight and input pass through fake-quantizers.

Each class is made from its float counterpart with `from_float(module, layer_config)`,
sharing the float module's parameters (so an optimizer built before the swap still
sees them), and turned back with `to_float()`; `to_float(fold=True)` writes the
fake-quantized weight into the float layer.

Example:
    >>> qlin = QuantLinear.from_float(nn.Linear(256, 64), LayerConfig(weight=QuantizerConfig(), activation=None))
    >>> y = qlin(x)                              # x: (B, 256) -> y: (B, 64)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.config import ConfigError, LayerConfig
from qat.fake_quant import FakeQuantizer, activation_quantizer, weight_quantizer
from qat.functional import check_finite, choose_qparams, int8_weight_multiplier
from qat.points import QuantPoint


class QuantModule:
    """Behaviour shared by the quantized layers (a mixin over the float layer class)."""

    float_class: type[nn.Module]
    layer_config: LayerConfig
    weight_quantizer: Optional[FakeQuantizer]
    input_quantizer: Optional[FakeQuantizer]
    activation_axis: int = -1

    def _attach_quantizers(self, config: LayerConfig, channels: int) -> None:
        self.layer_config = config
        check_finite(self.weight, "weight")
        weight = self.export_weight().detach()  # what the quantizer acts on (a folded BN's conv: W * gamma / sigma)
        self.weight_quantizer = weight_quantizer(config.weight, weight) if config.weight else None
        self.input_quantizer = (
            activation_quantizer(config.activation, channels, self.activation_axis).to(self.weight.device)
            if config.activation else None
        )

    def masked_weight(self) -> Tensor:
        """The weight times its `weight_mask` buffer if it has one (pruning, see qat.prune)."""
        mask = self._buffers.get("weight_mask")
        return self.weight if mask is None else self.weight * mask  # pruned weights quantize to exactly 0

    def export_weight(self) -> Tensor:
        """The float weight the weight quantizer acts on (and the file stores quantized): the masked weight
        here; a conv with a folded BatchNorm (qat.conv_bn) scales it by the BN."""
        return self.masked_weight()

    def quantized_weight(self) -> Tensor:
        """The weight the layer computes with: `masked_weight()`, fake-quantized when its quantizer is on."""
        weight = self.masked_weight()
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    integer_bias: bool = False  # set by prepare from QuantSpec.integer_bias

    def grid_bias(self, bias: Optional[Tensor], x: Optional[Tensor] = None) -> Optional[Tensor]:
        """`bias` rounded to the grid input scale x weight scale[c] / k that an integer runtime adds its bias on
        (int32 codes; ONNX QLinearConv / QGemm; k: `int8_weight_multiplier`, 8 for 4-bit weights), when
        `integer_bias` is on and the input comes from a QuantizedPoint (`x` carries it; the point last seen is
        kept for the export, `x=None`, and for inputs an op such as dropout passed on untagged). Straight
        through: the gradient reaches the float bias. Otherwise `bias` unchanged."""
        if not self.integer_bias or bias is None:
            return bias
        point = getattr(x, "qat_point", None) if x is not None else None
        if point is not None:
            self.__dict__["input_point"] = point  # a reference, not a submodule; kept for the export and for
        elif x is not None:  # forwards where an op in between (dropout) drops it; None: a forward ran, no point
            self.__dict__.setdefault("input_point", None)
        point = point or self.__dict__.get("input_point")
        own = self.input_quantizer if self.input_quantizer is not None and self.input_quantizer.enabled else None
        weights, inputs = self.weight_quantizer, own or getattr(point, "input_quantizer", None)
        if weights is None or inputs is None or weights.granularity == "group":
            return bias
        if not all(q.enabled and q.initialized and not q.calibrating for q in (weights, inputs)):
            return bias
        multiplier = int8_weight_multiplier(weights.config.bits, weights.config.symmetric)  # a power of two
        grid = (inputs.qparams()[0].reshape(()) * (weights.qparams()[0].reshape(-1) / multiplier)).to(bias.dtype)
        rounded = torch.round(bias / grid) * grid
        return bias + (rounded - bias).detach()

    @torch.no_grad()
    def init_weight_qparams(self) -> None:
        """Re-run range initialization of the weight quantizer on the current weight."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.init_from(self.weight)

    def _float_kwargs(self) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def to_float(self, fold: bool = False) -> nn.Module:
        """The float layer, sharing parameters; with `fold`, holding the fake-quantized weight."""
        module = self.float_class(**self._float_kwargs(), device="meta")
        module.weight = self.weight
        if getattr(self, "bias", None) is not None:
            module.bias = self.bias
        if fold and self.weight_quantizer is not None:
            module.weight = nn.Parameter(self.weight_quantizer(self.weight).detach().clone())
        return module.train(self.training)


class QuantLinear(QuantModule, nn.Linear):
    """nn.Linear with a fake-quantized weight (N, K) and, optionally, input (..., K)."""

    float_class = nn.Linear

    @classmethod
    def from_float(cls, module: nn.Linear, config: LayerConfig) -> QuantLinear:
        qmod = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        qmod.weight, qmod.bias = module.weight, module.bias
        qmod._attach_quantizers(config, module.in_features)
        return qmod.train(module.training)

    def _float_kwargs(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.grid_bias(self.bias, x))


class QuantConv2d(QuantModule, nn.Conv2d):
    """nn.Conv2d with a fake-quantized weight (O, I/groups, kh, kw), grouped along I*kh*kw."""

    float_class = nn.Conv2d
    activation_axis = 1

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: LayerConfig) -> QuantConv2d:
        qmod = cls(**cls._conv_kwargs(module), device="meta")
        qmod.weight, qmod.bias = module.weight, module.bias
        qmod._attach_quantizers(config, module.in_channels)
        return qmod.train(module.training)

    @staticmethod
    def _conv_kwargs(module: nn.Conv2d) -> dict:
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }

    def _float_kwargs(self) -> dict:
        return self._conv_kwargs(self)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.grid_bias(self.bias, x))


class QuantEmbedding(QuantModule, nn.Embedding):
    """nn.Embedding with a fake-quantized table (num_embeddings, dim), grouped along dim."""

    float_class = nn.Embedding

    @classmethod
    def from_float(cls, module: nn.Embedding, config: LayerConfig) -> QuantEmbedding:
        qmod = cls(**cls._embedding_kwargs(module), device="meta")
        qmod.weight = module.weight
        qmod._attach_quantizers(LayerConfig(weight=config.weight, activation=None), 0)
        return qmod.train(module.training)

    @staticmethod
    def _embedding_kwargs(module: nn.Embedding) -> dict:
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
            "max_norm": module.max_norm,
            "norm_type": module.norm_type,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }

    def _float_kwargs(self) -> dict:
        return self._embedding_kwargs(self)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(
            ids, self.quantized_weight(), self.padding_idx, self.max_norm,
            self.norm_type, self.scale_grad_by_freq, self.sparse,
        )


class QuantizedPoint(QuantModule, nn.Module):
    """A `QuantPoint` (qat.points) once prepared: fake-quantizes the tensor passing through, per tensor.

    It has no weight; its one quantizer is the `input_quantizer` of the quantized-layer interface, so
    calibration, freezing, export and loading treat it as a layer whose input is quantized."""

    float_class = QuantPoint

    def __init__(self) -> None:
        super().__init__()
        self.weight_quantizer = None
        self.input_quantizer = None
        self.fixed_range: Optional[tuple[float, float]] = None

    @classmethod
    def from_float(cls, module: QuantPoint, config: LayerConfig) -> QuantizedPoint:
        activation = config.activation
        if activation is None:
            raise ValueError("a QuantPoint needs an activation setting")
        if activation.granularity != "tensor":
            raise ConfigError(f"a QuantPoint quantizes per tensor; its activation granularity is "
                              f"{activation.granularity!r} (set granularity: tensor in its rule)")
        qmod = cls()
        qmod.layer_config = LayerConfig(weight=None, activation=activation)
        qmod.input_quantizer = activation_quantizer(activation, 1, -1)
        qmod.fixed_range = module.fixed_range
        if module.fixed_range is not None:  # known range: fixed, never calibrated or learned
            low, high = (torch.tensor([bound]) for bound in module.fixed_range)
            scale, zero = choose_qparams(low, high, activation.bits, activation.symmetric, activation.is_signed)
            qmod.input_quantizer.set_qparams(scale, zero)
            qmod.input_quantizer.freeze()
        return qmod.train(module.training)

    def to_float(self, fold: bool = False) -> nn.Module:
        return QuantPoint(*(self.fixed_range or ())).train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        out = self.quantized_input(x)
        if self.input_quantizer is not None:  # the next layer's integer bias grid is this point's scale (also
            out.qat_point = self  # while calibrating, when `out` is `x`: the link is structural)
        return out


QUANT_MODULES: dict[type[nn.Module], type[QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
    QuantPoint: QuantizedPoint,
}
