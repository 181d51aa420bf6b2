"""Quantized layers -> stored tensors, and stored tensors -> weights (the format's formula).

Codes come from the layer's own quantizer: `FakeQuantizer.qparams()` gives the scale
and zero point training applies, and `qat.functional.quantize` the codes, computed on
the weight in float32 exactly as the fake-quant forward does. Stored codes are
u = q - qmin in [0, 2^bits - 1]; stored zeros are z - qmin (uint8); scales are stored
in the quantizer's scale dtype, which they already hold exactly. So

    (u - stored_zero) * scale  ==  (q - z) * scale  ==  the fake-quant weight, bit for bit
    (the one exception is the sign of zero: -0.0 from training is +0.0 here; see docs/FORMAT.md).

Example:
    >>> spec, tensors = pack_layer(model.fc)            # {'weight_packed': ..., 'weight_scales': ...}
    >>> w = dequantize_weight(spec.weight, tensors)     # float32, model.fc.weight's shape
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from qat.export.format import CODES, INPUT_SCALE, INPUT_ZERO, LAYOUT_INT4, PACKED, SCALES, ZEROS, ExportError
from qat.export.spec import ConvSpec, InputSpec, LayerSpec, WeightSpec, choose_layout
from qat.fake_quant import FakeQuantizer
from qat.functional import NonFiniteError, check_finite, expand_qparam, grouped_view, quantize
from qat.kernels.reference import pack_int4, unpack_int4
from qat.modules import QuantConv2d, QuantEmbedding, QuantizedPoint, QuantLinear, QuantModule

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}


def _per_row(param: Tensor, rows: int) -> Tensor:
    """Stored qparam shape (), (N,) or (N, G) -> (N, G) with G = 1 for tensor / channel."""
    if param.dim() == 0:
        return param.reshape(1, 1).expand(rows, 1).contiguous()
    return param.reshape(rows, -1).contiguous()


def quantized_codes(quantizer: FakeQuantizer, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stored codes u (uint8 (N, K)), scales (float32 (N, G)) and stored zeros (float32 (N, G))."""
    config = quantizer.config
    scale, zero = quantizer.qparams()  # the qparams the fake-quant forward applies
    # float32, as the fake-quant forward (qat.ste) computes for every weight dtype
    view = grouped_view(weight.detach().float(), quantizer.granularity, quantizer.group_size, quantizer.axis)
    s = expand_qparam(scale, quantizer.granularity, view.dim(), quantizer.axis)
    z = expand_qparam(zero, quantizer.granularity, view.dim(), quantizer.axis)
    codes = quantize(view, s, z, config.qmin, config.qmax)  # the op training uses
    rows = weight.shape[0]
    stored = (codes.float() - config.qmin).to(torch.uint8).reshape(rows, -1)
    return stored, _per_row(scale, rows), _per_row(zero - config.qmin, rows)


def weight_spec(quantizer: FakeQuantizer, weight: Tensor, has_zeros: bool) -> WeightSpec:
    config = quantizer.config
    columns = weight[0].numel()
    return WeightSpec(
        layout=choose_layout(config.bits, columns),
        bits=config.bits,
        signed=config.is_signed,
        symmetric=config.symmetric,
        granularity=config.granularity,
        group_size=quantizer.group_size or columns,
        scale_dtype=config.scale_dtype,
        zeros=has_zeros,
        shape=tuple(weight.shape),
        dtype=DTYPE_NAMES[weight.dtype],
        quantizer=config.quantizer,
    )


def pack_weight(quantizer: FakeQuantizer, weight: Tensor) -> tuple[WeightSpec, dict[str, Tensor]]:
    """The stored tensors {suffix: tensor} of one quantized weight, and their spec."""
    codes, scales, zeros = quantized_codes(quantizer, weight)
    # Symmetric layers whose zero points are all 0 (always, unless set by hand) omit zeros.
    has_zeros = not (quantizer.config.symmetric and bool((zeros == -quantizer.config.qmin).all()))
    spec = weight_spec(quantizer, weight, has_zeros)
    data = (PACKED, pack_int4(codes)) if spec.layout == LAYOUT_INT4 else (CODES, codes)
    tensors = {data[0]: data[1], SCALES: scales.to(quantizer.config.torch_scale_dtype)}
    if has_zeros:
        tensors[ZEROS] = zeros.to(torch.uint8)
    return spec, tensors


def pack_input(quantizer: FakeQuantizer) -> tuple[InputSpec, dict[str, Tensor]]:
    """Spec and tensors of a static input quantizer (scale in its scale dtype, zero point int32)."""
    config = quantizer.config
    scale, zero = quantizer.qparams()
    spec = InputSpec(
        bits=config.bits,
        signed=config.is_signed,
        symmetric=config.symmetric,
        granularity=config.granularity,
        axis=quantizer.axis,
        channels=int(scale.numel()) if config.granularity == "channel" else 0,
        scale_dtype=config.scale_dtype,
        quantizer=config.quantizer,
    )
    return spec, {INPUT_SCALE: scale.to(config.torch_scale_dtype), INPUT_ZERO: zero.to(torch.int32)}


def conv_spec(module: nn.Conv2d) -> ConvSpec:
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return ConvSpec(tuple(module.stride), padding, tuple(module.dilation), module.groups, module.padding_mode)


def _check_quantizer(name: str, role: str, quantizer: FakeQuantizer) -> None:
    if quantizer.calibrating:
        raise ExportError(f"layer '{name}': the {role} quantizer is still calibrating; finish calibration first")
    if not quantizer.initialized:
        raise ExportError(f"layer '{name}': the {role} quantizer was never initialized (calibrate the model first)")


def pack_layer(module: QuantModule, name: str = "") -> tuple[LayerSpec, dict[str, Tensor]]:
    """Spec and tensors {suffix: tensor} of one quantized layer (weight and input quantization).

    A disabled input quantizer is not recorded (the model computes without it); a disabled
    weight quantizer raises `ExportError`, since the file would hold no quantized weight.
    """
    types = {QuantLinear: "Linear", QuantConv2d: "Conv2d", QuantEmbedding: "Embedding", QuantizedPoint: "QuantPoint"}
    layer_type = next((kind for cls, kind in types.items() if isinstance(module, cls)), None)
    if layer_type is None:
        raise ExportError(f"layer '{name}': {type(module).__name__} has no export rule")
    if layer_type == "Embedding" and module.max_norm is not None:
        raise ExportError(f"layer '{name}': Embedding with max_norm renormalizes its weight in place; cannot export")
    weight_spec_, tensors = _pack_layer_weight(module, name)
    input_spec: Optional[InputSpec] = None
    quantizer = module.input_quantizer
    if quantizer is not None and quantizer.enabled:
        _check_quantizer(name, "input", quantizer)
        input_spec, input_tensors = pack_input(quantizer)
        tensors.update(input_tensors)
    if weight_spec_ is None and input_spec is None:
        raise ExportError(f"layer '{name}': no enabled quantizer; enable one or unprepare the layer")
    conv = conv_spec(module) if layer_type == "Conv2d" else None
    return LayerSpec(type=layer_type, weight=weight_spec_, input=input_spec, conv=conv), tensors


def _pack_layer_weight(module: QuantModule, name: str) -> tuple[Optional[WeightSpec], dict[str, Tensor]]:
    quantizer = module.weight_quantizer
    if quantizer is None:
        return None, {}
    if not quantizer.enabled:
        raise ExportError(f"layer '{name}': the weight quantizer is disabled (fake-quant is off, e.g. a checkpoint "
                          "from before quantization started); export a later checkpoint, or enable it with "
                          "qat.set_fake_quant(model, weights=True) to export the weights as they would quantize")
    _check_quantizer(name, "weight", quantizer)
    weight = module.export_weight()
    try:
        check_finite(weight, f"layer '{name}' weight")
    except NonFiniteError as err:
        raise ExportError(str(err)) from None
    return pack_weight(quantizer, weight)


# ---- the format's dequantization formula ----------------------------------------------------
def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Optional[Tensor], implied_zero: int,
                     group_size: int) -> Tensor:
    """float32 (..., K) from stored codes (..., K): (u - zero) * scale per group of `group_size`.

    The leading dims of `codes`, `scales` (..., G) and `zeros` (..., G) agree; `zeros` None
    means every group's zero is `implied_zero`.
    """
    lead, k = codes.shape[:-1], codes.shape[-1]
    grouped = codes.float().reshape(*lead, k // group_size, group_size)  # (..., G, g)
    zero = zeros.float() if zeros is not None else torch.full_like(scales, implied_zero, dtype=torch.float32)
    return ((grouped - zero.unsqueeze(-1)) * scales.float().unsqueeze(-1)).reshape(*lead, k)


def stored_codes(spec: WeightSpec, tensors: dict[str, Tensor]) -> Tensor:
    """uint8 codes (N, K) from a weight's stored tensors (either layout)."""
    return unpack_int4(tensors[PACKED]) if spec.layout == LAYOUT_INT4 else tensors[CODES]


def dequantize_weight(spec: WeightSpec, tensors: dict[str, Tensor]) -> Tensor:
    """float32 weight of the float model's shape, from stored tensors {suffix: tensor}."""
    codes = stored_codes(spec, tensors)
    weights = dequantize_codes(codes, tensors[SCALES], tensors.get(ZEROS), spec.implied_zero, spec.group_size)
    return weights.reshape(spec.shape)
