"""BatchNorm folded into the convolution before it, for QAT: the folded weight is what is quantized.

An integer runtime has no BatchNorm: it runs conv(x, W') + b' with

    W' = W * gamma / sqrt(var + eps)            (per output channel)
    b' = beta + (b - mean) * gamma / sqrt(var + eps)

so W' is the weight that must be quantized, and QAT must train through quantize(W'), not through
quantize(W) followed by a float BatchNorm. With `QuantSpec(fold_batchnorm=True)`, `qat.prepare` pairs
each Conv2d with the BatchNorm2d that directly follows it in an `nn.Sequential` (same channel count)
and swaps in:

    QuantConvBn2d      the conv; computes conv + BN itself while its weight quantizer is on
    FoldedBatchNorm2d  the BN, sharing its parameters and statistics (same state_dict names); passes
                       its input through while its conv folds it, and is a plain BatchNorm otherwise

Fake-quant off (float warm-up): conv, then BatchNorm, exactly the float model. Fake-quant on:
  - BN in eval mode (`schedule.freeze_bn_step`, or model.eval()): conv(x, q(W'), b') with the running
    statistics: exactly what the exported file computes.
  - BN in training mode: Jacob et al. 2018, sec. 3.2 / PyTorch's ConvBn: the weight is folded with the
    running std, quantized, the conv output is divided back by gamma / sqrt(var + eps), and BatchNorm
    normalises it with the batch statistics (and updates the running ones), so training sees the
    quantized weight's rounding while the statistics keep adapting.

Example:
    >>> model, report = qat.prepare(model, QuantSpec(fold_batchnorm=True, weight=...))
    >>> qat.export_model(model, "model.safetensors", ...)   # conv weight W' quantized, bias b'; no BN
"""

from __future__ import annotations

from itertools import pairwise
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.config import LayerConfig
from qat.modules import QuantConv2d


def _sharing(cls: type[nn.BatchNorm2d], bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A `cls` with `bn`'s settings holding `bn`'s very parameters and buffers (so its state_dict)."""
    shared = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    for name, param in bn.named_parameters(recurse=False):
        setattr(shared, name, param)
    for name, buffer in bn.named_buffers(recurse=False):
        shared._buffers[name] = buffer
    return shared.train(bn.training)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that a `QuantConvBn2d` folds: identity while `folded` (set by the conv at each call)."""

    folded: bool = False

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FoldedBatchNorm2d:
        """A FoldedBatchNorm2d sharing `bn`'s parameters and buffers (so its state_dict names and values)."""
        return _sharing(cls, bn)

    def to_batchnorm(self) -> nn.BatchNorm2d:
        """The plain BatchNorm2d, sharing the parameters and buffers."""
        return _sharing(nn.BatchNorm2d, self)

    def fold_factor(self) -> Tensor:
        """gamma / sqrt(running_var + eps), per channel (float32)."""
        gamma = self.weight if self.affine else torch.ones_like(self.running_var)
        return gamma.float() / torch.sqrt(self.running_var.float() + self.eps)

    def folded_bias(self, conv_bias: Optional[Tensor]) -> Tensor:
        """beta + (b - running_mean) * gamma / sqrt(running_var + eps)."""
        beta = self.bias if self.affine else torch.zeros_like(self.running_mean)
        b = conv_bias if conv_bias is not None else torch.zeros_like(self.running_mean)
        return beta + (b - self.running_mean) * self.fold_factor()

    def forward(self, x: Tensor) -> Tensor:
        return x if self.folded else super().forward(x)


class QuantConvBn2d(QuantConv2d):
    """A QuantConv2d that folds the BatchNorm after it (see the module docstring).

    The BN is held by reference, not as a submodule: it stays where it was in the model (as a
    FoldedBatchNorm2d), so every state_dict name is the float model's."""

    bn: FoldedBatchNorm2d

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: FoldedBatchNorm2d, config: LayerConfig) -> QuantConvBn2d:
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm2d has {bn.num_features} channels, the conv before it {conv.out_channels}")
        qmod = cls(**cls._conv_kwargs(conv), device="meta")
        qmod.weight, qmod.bias = conv.weight, conv.bias
        qmod.__dict__["bn"] = bn  # a reference, not a submodule (no second state_dict entry)
        qmod._attach_quantizers(config, conv.in_channels)
        return qmod.train(conv.training)

    @torch.no_grad()
    def init_weight_qparams(self) -> None:
        """Range initialization of the weight quantizer on the folded weight W'."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.init_from(self.export_weight())

    def export_weight(self) -> Tensor:
        """W' = W * gamma / sqrt(running_var + eps): the weight the quantizer acts on and the file stores."""
        weight = self.masked_weight()
        return weight * self.bn.fold_factor().to(weight.dtype).reshape(-1, 1, 1, 1)

    def export_bias(self, x: Optional[Tensor] = None) -> Tensor:
        """b' = beta + (b - running_mean) * gamma / sqrt(running_var + eps), on the integer grid when
        `integer_bias` is on (`grid_bias`; `x`: the forward's input, None at export)."""
        return self.grid_bias(self.bn.folded_bias(self.bias), x)

    def quantized_weight(self) -> Tensor:
        weight = self.export_weight()
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    def _folds(self) -> bool:
        quantizer = self.weight_quantizer
        return quantizer is not None and quantizer.enabled and not quantizer.calibrating

    def forward(self, x: Tensor) -> Tensor:
        folds = self._folds()
        self.bn.folded = folds
        x = self.quantized_input(x)
        if not folds:
            return self._conv_forward(x, self.masked_weight(), self.bias)  # the BN module follows
        if not self.bn.training:
            return self._conv_forward(x, self.quantized_weight(), self.export_bias(x))
        factor = self.bn.fold_factor().reshape(1, -1, 1, 1)
        y = self._conv_forward(x, self.quantized_weight(), None) / factor
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)

    def to_float(self, fold: bool = False) -> nn.Module:
        """The float conv (the BN stays a separate module: see `unfold_batchnorm`); `fold` is refused here,
        since the quantized weight includes the BN: use qat.unprepare(fold=True), which also removes the BN."""
        if fold:
            raise ValueError("a conv with a folded BatchNorm unprepares with fold=True through qat.unprepare")
        return super().to_float()

    def folded_float(self) -> nn.Conv2d:
        """A float Conv2d holding q(W') and b': conv + BN of the fake-quant model in eval mode, in one layer."""
        kwargs = {**self._float_kwargs(), "bias": True}
        conv = nn.Conv2d(**kwargs, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.quantized_weight())
            conv.bias.copy_(self.export_bias())
        return conv.train(self.training)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{conv name: BN name} for each Conv2d directly followed by a BatchNorm2d of its channel count in an
    nn.Sequential (the layout `fold_batchnorm` folds)."""
    pairs: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_key, conv), (bn_key, bn) in pairwise(children):
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d \
                    and bn.num_features == conv.out_channels:
                prefix = f"{name}." if name else ""
                pairs[prefix + conv_key] = prefix + bn_key
    return pairs


def fold_into_skeleton(model: nn.Module, folded: dict[str, str]) -> None:
    """For `qat.load`: each BN named in `folded` ({BN name: conv name}) becomes nn.Identity and its conv
    gains a bias (on the meta device, filled from the file)."""
    for bn_name, conv_name in folded.items():
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"'{bn_name}' folded into '{conv_name}': expected a BatchNorm and a Conv2d, the "
                            f"architecture has {type(bn).__name__} and {type(conv).__name__}")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty(conv.out_channels, device="meta"))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
