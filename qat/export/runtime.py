"""Inference layers that hold only packed codes, scales and zeros (no float weight).

`qat.load` swaps these in for the quantized layers of a rebuilt model. Their buffers
have the names of the file's tensors (`weight_packed` or `weight_codes`,
`weight_scales`, `weight_zeros`, `input_quantizer.scale` / `.zero_point`, `bias`), so
a layer's state is exactly its slice of the file.

    PackedLinear     int4 layout -> qat.kernels.dispatch.int4_linear; uint8 layout -> dequantize + F.linear
    PackedConv2d     dequantize (O, I*kh*kw) -> (O, I, kh, kw), then conv2d
    PackedEmbedding  gathers the packed rows of the ids, dequantizes only those

Example:
    >>> model = qat.load("model.safetensors")
    >>> model.fc                 # PackedLinear(in_features=256, out_features=64, int4, bits=4, group_size=128)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.export.format import FLOAT_DTYPE_NAMES, LAYOUT_INT4, ST_TO_TORCH, ZEROS
from qat.export.pack import dequantize_codes
from qat.export.spec import InputSpec, LayerSpec, WeightSpec
from qat.functional import SCALE_EPS, expand_qparam, fake_quantize
from qat.kernels import dispatch
from qat.kernels.names import DEQUANT, DEQUANT_CACHED
from qat.kernels.native import native_module
from qat.kernels.reference import SYMMETRIC_ZERO, unpack_int4
from qat.kernels.weights import auto_choices_of


class InputQuantizer(nn.Module):
    """Static fake-quantization of a layer's input with recorded scale / zero point.

    Computes exactly what the training quantizer's forward computes:
    dequantize(quantize(x.float(), s, z)) in float32, cast back to x's dtype. A float32 CPU tensor quantized
    per tensor takes the compiled one-pass kernel (kernels/csrc/fake_quant.cpp: the same operations, bit for
    bit; ~6x less memory traffic than the six torch ops, which made the int4 EfficientNet-Lite0 with its 60
    activation points 2x slower than float). An input that requires grad (an attack on the loaded model,
    qat.eval.adversarial) gets the training quantizer's straight-through gradient: 1 inside the range, 0 where
    clipped (round alone has a zero gradient everywhere).
    """

    def __init__(self, spec: InputSpec, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.spec = spec
        (shape, st_dtype), (zero_shape, _) = spec.tensor_shapes().values()
        self.register_buffer("scale", torch.empty(shape, dtype=ST_TO_TORCH[st_dtype], device=device))
        self.register_buffer("zero_point", torch.empty(zero_shape, dtype=torch.int32, device=device))
        self._kernel_args: Optional[tuple] = None  # (scale, zero point, their versions, kernel arguments)

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        # plain tensors only: not while torch.export / ONNX export traces the model (fake tensors), and no
        # autograd through the kernel
        if spec.granularity == "tensor" and type(x) is Tensor and x.dtype == torch.float32 and x.is_cpu \
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling():
            module = native_module()
            if module is not None:
                return module.fake_quant_per_tensor(x, *self.kernel_args())
        scale = expand_qparam(self.scale.float(), spec.granularity, x.dim(), spec.axis)
        zero = expand_qparam(self.zero_point.float(), spec.granularity, x.dim(), spec.axis)
        qmin, qmax = spec.qrange
        quantized = fake_quantize(x.float(), scale, zero, qmin, qmax)  # float32, as qat.ste
        if x.requires_grad and torch.is_grad_enabled():  # straight-through; the forward value is unchanged
            codes = torch.round(x.float() / scale) + zero
            inside = (codes >= qmin) & (codes <= qmax)
            quantized = quantized + (x.float() - x.float().detach()) * inside
        return quantized.to(x.dtype)

    def kernel_args(self) -> tuple[float, float, int, int]:
        """(scale, zero point, qmin, qmax) as Python numbers for the per-tensor kernel; read from the buffers
        again only when one was replaced or written (two tensor reads per call were most of a point's cost:
        ~7 of 9 us at batch 1)."""
        scale, zero = self._buffers["scale"], self._buffers["zero_point"]  # not through nn.Module.__getattr__
        cached = self._kernel_args
        if cached is None or cached[0] is not scale or cached[1] is not zero \
                or cached[2] != (scale._version, zero._version):
            cached = (scale, zero, (scale._version, zero._version),
                      (float(scale.float()), float(zero), *self.spec.qrange))
            self._kernel_args = cached
        return cached[3]

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, {'' if s.symmetric else 'a'}symmetric, {s.granularity}"


def dynamic_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Symmetric fake-quantization of each token (last-dim row) of `x` to `bits` bits.

    scale = max|row| / (2^(bits-1) - 1) (at least SCALE_EPS), codes = clamp(round(x / scale)),
    computed in float32 and cast back to x's dtype.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(SCALE_EPS)
    return fake_quantize(x.float(), scale, torch.zeros_like(scale), -qmax - 1, qmax).to(x.dtype)


class _PackedWeight(nn.Module):
    """Buffers and dequantization shared by the packed layers."""

    def _init_packed(self, spec: LayerSpec, device: torch.device | str) -> None:
        self.spec = spec
        weight: WeightSpec = spec.weight
        for suffix, (shape, st_dtype) in weight.tensor_shapes().items():
            self.register_buffer(suffix, torch.empty(shape, dtype=ST_TO_TORCH[st_dtype], device=device))
        if ZEROS not in weight.tensor_shapes():
            self.weight_zeros = None
        self.input_quantizer = InputQuantizer(spec.input, device) if spec.input is not None else None
        self.dynamic_activation_bits: Optional[int] = None
        self.kernel_backend: Optional[str] = None  # None: dispatch chooses (or $QAT_KERNEL_BACKEND)

    @property
    def weight_spec(self) -> WeightSpec:
        return self.spec.weight

    def finish_loading(self) -> None:
        """Called once the buffers hold the file's data: adds the kernel's zeros where needed."""
        w = self.weight_spec
        if w.layout == LAYOUT_INT4 and not w.zeros and w.implied_zero != SYMMETRIC_ZERO:
            zeros = torch.full((w.rows, w.groups), w.implied_zero, dtype=torch.uint8, device=self.weight_scales.device)
            self.register_buffer("kernel_zeros", zeros, persistent=False)

    def kernel_zeros_or_none(self) -> Optional[Tensor]:
        """Zeros in the form the int4 kernel takes: stored zeros, or None meaning 8."""
        if self.weight_zeros is not None:
            return self.weight_zeros
        return getattr(self, "kernel_zeros", None)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight (the float layer's shape): (u - zero) * scale, computed on the fly."""
        w = self.weight_spec
        codes = unpack_int4(self.weight_packed) if w.layout == LAYOUT_INT4 else self.weight_codes
        flat = dequantize_codes(codes, self.weight_scales, self.weight_zeros, w.implied_zero, w.group_size)
        return flat.reshape(w.shape)

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.dynamic_activation_bits is not None:
            x = dynamic_per_token(x, self.dynamic_activation_bits)
        return x

    def kernels_run(self) -> set[str]:
        """The kernels this layer's calls so far went through (what `qat verify` reports): convolutions,
        embeddings and uint8-layout weights are dequantized in x's dtype, then the float op runs (exact)."""
        return {DEQUANT}

    def _describe(self) -> str:
        w = self.weight_spec
        return f"{w.layout}, bits={w.bits}, group_size={w.group_size}, scales={w.scale_dtype}"


class PackedLinear(_PackedWeight):
    """y = x @ W.T + b with W stored packed; int4-layout layers run `dispatch.int4_linear`."""

    def __init__(self, skeleton: nn.Linear, spec: LayerSpec, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.in_features, self.out_features = skeleton.in_features, skeleton.out_features
        self._init_packed(spec, device)
        self.bias = skeleton.bias

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        w = self.weight_spec
        # an input that requires grad takes the exact dequant path: some int4 kernels have no backward
        # (cpu_int4pack: "derivative ... not implemented")
        if w.layout == LAYOUT_INT4 and not (x.requires_grad and torch.is_grad_enabled()):
            return dispatch.int4_linear(
                x, self.weight_packed, self.weight_scales, self.kernel_zeros_or_none(), w.group_size, self.bias,
                backend=self.kernel_backend,
            )
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def kernels_run(self) -> set[str]:
        """The int4 kernels dispatch ran for this layer so far, or the one it was told to run."""
        if self.weight_spec.layout != LAYOUT_INT4:
            return super().kernels_run()
        requested = dispatch.requested_backend(self.kernel_backend)
        return auto_choices_of(self.weight_packed) if requested == dispatch.AUTO else {requested}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._describe()}"


class PackedConv2d(_PackedWeight):
    """Conv2d whose weight is dequantized from packed codes at each call, or once and kept (in x's dtype,
    on x's device) when the kernel backend is `dequant_cached` (the argument of `qat.load`, or
    $QAT_KERNEL_BACKEND): the float conv's speed at the float conv's memory. Both are exact."""

    def __init__(self, skeleton: nn.Conv2d, spec: LayerSpec, device: torch.device | str = "meta") -> None:
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(skeleton, attr))
        self._init_packed(spec, device)
        self.bias = skeleton.bias
        self._cached_weight: Optional[Tensor] = None

    def conv_weight(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight in `dtype`: kept after the first call under `dequant_cached`."""
        if dispatch.requested_backend(self.kernel_backend) != DEQUANT_CACHED:
            return self.dequantized_weight().to(dtype)
        cached = self._cached_weight
        if cached is None or cached.dtype != dtype or cached.device != self.weight_scales.device:
            cached = self._cached_weight = self.dequantized_weight().to(dtype)
        return cached

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        weight = self.conv_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            padded = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, {self._describe()}")


class PackedEmbedding(_PackedWeight):
    """Embedding lookup that unpacks and dequantizes only the looked-up rows."""

    def __init__(self, skeleton: nn.Embedding, spec: LayerSpec, device: torch.device | str = "meta",
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = skeleton.num_embeddings, skeleton.embedding_dim
        self.padding_idx = skeleton.padding_idx
        self._init_packed(spec, device)
        self.output_dtype = dtype or FLOAT_DTYPE_NAMES[spec.weight.dtype]

    def forward(self, ids: Tensor) -> Tensor:
        w = self.weight_spec
        flat = ids.reshape(-1)
        data = self.weight_packed if w.layout == LAYOUT_INT4 else self.weight_codes
        rows = torch.index_select(data, 0, flat)  # index_select rejects negative / out-of-range ids
        codes = unpack_int4(rows) if w.layout == LAYOUT_INT4 else rows
        scales = torch.index_select(self.weight_scales, 0, flat)
        zeros = None if self.weight_zeros is None else torch.index_select(self.weight_zeros, 0, flat)
        values = dequantize_codes(codes, scales, zeros, w.implied_zero, w.group_size)  # (T, D)
        return values.to(self.output_dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._describe()}"


PACKED_LAYERS: dict[str, type[_PackedWeight]] = {
    "Linear": PackedLinear,
    "Conv2d": PackedConv2d,
    "Embedding": PackedEmbedding,
}
