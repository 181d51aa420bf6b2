"""Several linear layers that read the same input, run as one call (q|k|v, gate|up).

A decode step is dominated by per-call overhead, not arithmetic: running a Llama layer's
q, k and v projections as one matmul (and gate and up as another) removes two kernel calls
of three. `fuse_linears` concatenates the layers' weights along the output dimension once
and makes the original layers' tensors views of the fused ones, so memory stays what it
was and both the model and the fused call keep working on the same storage.

What fuses:
* plain `nn.Linear` layers with the same input size, dtype and device: one `F.linear`;
* qat's int4 `PackedLinear` layers (as `qat.load` builds them) with the same group size,
  scale dtype and kernel backend and no input quantizer: one `PackedInt4Weight` called
  through the int4 dispatch (zeros of symmetric layers become explicit 8s where the others
  store zeros);
* anything else runs layer by layer and the outputs are concatenated (same result, more calls).

Inputs of another dtype than a float layer's weight are cast to it, and outputs back to the
input's dtype (int4 kernels take any float input).

Example:
    >>> qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    >>> q, k, v = qkv(x).split(qkv.sizes, dim=-1)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.export.format import LAYOUT_INT4
from qat.export.runtime import PackedLinear
from qat.kernels import PackedInt4Weight, bind, int4_linear_prepared
from qat.kernels.reference import SYMMETRIC_ZERO
from qat.kernels.weights import cached_weight


class FusedLinear:
    """Call it on x (..., K): the outputs of the fused layers, concatenated (..., sum of sizes).

    `bind(x)` returns the same call specialised to inputs like x (dtype, device, rows): for int4
    layers the kernel is chosen and checked once (`qat.kernels.dispatch.bind`), which a decode
    loop calling every layer once per token needs.
    """

    def __init__(self, run: Callable[[Tensor], Tensor], sizes: list[int], kind: str,
                 int4: Optional[PackedInt4Weight] = None, backend: Optional[str] = None) -> None:
        self.run, self.sizes, self.kind, self.int4, self.backend = run, sizes, kind, int4, backend

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(x)

    def bind(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """This call for inputs like `x` only, with per-call checks done once (int4 layers)."""
        return self.run if self.int4 is None else bind(x, self.int4, self.backend)

    def __repr__(self) -> str:
        return f"FusedLinear({self.kind}, sizes={self.sizes})"


def _out_features(layer: nn.Module) -> int:
    return int(layer.out_features)


def _is_plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks


def _is_plain_int4(layer: nn.Module) -> bool:
    return (isinstance(layer, PackedLinear) and layer.weight_spec.layout == LAYOUT_INT4
            and layer.input_quantizer is None and layer.dynamic_activation_bits is None
            and not layer._forward_hooks and not layer._forward_pre_hooks)


def _same(values: Sequence[object]) -> bool:
    return all(value == values[0] for value in values)


def _fused_bias(layers: Sequence[nn.Module], dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """The concatenated biases (zeros for layers without one), or None when no layer has a bias."""
    if all(layer.bias is None for layer in layers):
        return None
    parts = [torch.zeros(_out_features(layer), dtype=dtype, device=device) if layer.bias is None
             else layer.bias.detach().to(dtype) for layer in layers]
    return torch.cat(parts)


def _fuse_dense(layers: Sequence[nn.Linear]) -> FusedLinear:
    weight = torch.cat([layer.weight.detach() for layer in layers])  # (sum N, K)
    bias = _fused_bias(layers, weight.dtype, weight.device)
    start = 0
    for layer in layers:  # the layers now read slices of the fused weight: no second copy
        rows = layer.out_features
        layer.weight = nn.Parameter(weight[start:start + rows], requires_grad=layer.weight.requires_grad)
        start += rows

    def run(x: Tensor) -> Tensor:
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return FusedLinear(run, [layer.out_features for layer in layers], "dense")


def _fuse_int4(layers: Sequence[PackedLinear]) -> FusedLinear:
    zeros_each = [layer.kernel_zeros_or_none() for layer in layers]
    bias_dtype = next((layer.bias.dtype for layer in layers if layer.bias is not None), torch.float32)
    bias = _fused_bias(layers, bias_dtype, layers[0].weight_packed.device)
    group_size, backend = layers[0].weight_spec.group_size, layers[0].kernel_backend
    if len(layers) == 1 and bias is None:  # the layer's own tensors and kernel forms, as its forward uses them
        fused = cached_weight(layers[0].weight_packed, layers[0].weight_scales, zeros_each[0], group_size)
        return FusedLinear(lambda x: int4_linear_prepared(x, fused, backend=backend),
                           [layers[0].out_features], "int4", fused, backend)
    if len(layers) == 1:
        packed, scales, zeros = layers[0].weight_packed, layers[0].weight_scales, zeros_each[0]
    else:
        packed = torch.cat([layer.weight_packed for layer in layers])  # (sum N, K / 2)
        scales = torch.cat([layer.weight_scales for layer in layers])
        zeros = None
        if any(z is not None for z in zeros_each):
            zeros = torch.cat([torch.full_like(layer.weight_scales, SYMMETRIC_ZERO, dtype=torch.uint8) if z is None
                               else z for layer, z in zip(layers, zeros_each, strict=True)])
        start = 0
        for layer, own_zeros in zip(layers, zeros_each, strict=True):  # buffers become views of the fused ones
            rows = slice(start, start + layer.out_features)
            layer.weight_packed, layer.weight_scales = packed[rows], scales[rows]
            if own_zeros is not None:
                setattr(layer, "weight_zeros" if layer.weight_zeros is not None else "kernel_zeros", zeros[rows])
            start += layer.out_features
    fused = PackedInt4Weight(packed, scales, zeros, group_size, bias)
    return FusedLinear(lambda x: int4_linear_prepared(x, fused, backend=backend),
                       [layer.out_features for layer in layers], "int4", fused, backend)


def _weight_dtype(layer: nn.Module) -> Optional[torch.dtype]:
    """The dtype a layer's float weight has (None for layers that take any float input, e.g. packed int4)."""
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else None


def _run_each(layers: Sequence[nn.Module]) -> FusedLinear:
    dtypes = [_weight_dtype(layer) for layer in layers]

    def run(x: Tensor) -> Tensor:
        pairs = zip(layers, dtypes, strict=True)
        outs = [layer(x if dtype is None else x.to(dtype)).to(x.dtype) for layer, dtype in pairs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    kind = type(layers[0]).__name__ if len(layers) == 1 else "separate"
    return FusedLinear(run, [_out_features(layer) for layer in layers], kind)


def fuse_linears(layers: Sequence[nn.Module]) -> FusedLinear:
    """One call for `layers` (same input): fused where their weights allow (see module docstring)."""
    if not layers:
        raise ValueError("fuse_linears needs at least one layer")
    if len(layers) > 1 and all(_is_plain_linear(layer) for layer in layers):
        keys = [(layer.in_features, layer.weight.dtype, layer.weight.device) for layer in layers]
        if _same(keys):
            return _fuse_dense(layers)
    if all(_is_plain_int4(layer) for layer in layers):
        keys = [(layer.in_features, layer.weight_spec.group_size, layer.weight_scales.dtype, layer.kernel_backend,
                 layer.weight_packed.device) for layer in layers]
        bias_dtypes = {layer.bias.dtype for layer in layers if layer.bias is not None}
        if _same(keys) and len(bias_dtypes) <= 1:
            return _fuse_int4(layers)
    return _run_each(layers)
