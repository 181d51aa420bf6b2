"""The CPU paths for int4 linear layers.

Three ways, measured side by side in benchmarks/kernels/int4-cpu.md (2 threads, 4096x4096):

* `linear_int4pack`: torch's built-in `aten._weight_int4pack_mm_for_cpu` (AVX512/AVX2
  "tinygemm" kernel) on tiles made once per layer by `aten._convert_weight_to_int4pack_for_cpu`.
  It computes in bfloat16 (activations rounded to bf16, fp32 accumulation, bf16 output) and
  dequantizes as (code - 8) * scale + offset with offset = (8 - zero) * scale rounded to bf16,
  so it is NOT bit-exact: see the tolerance in tests/kernels/tolerances.py. Only its bf16
  kernel is vectorized on x86 (its fp32/fp16 kernels are scalar and ~50x slower), so fp32
  and fp16 activations go through bf16. Fast at small M (the memory-bound case).
* `linear_dequantized`: dequantize to x's dtype, then the dense matmul: bit-identical to
  reference.int4_linear_reference. With `cache=True` the dequantized weight is kept with
  the layer (2-4 bytes per weight instead of 0.5): as fast as the dense layer, exactly.
* `linear_bf16_cached`: the weight dequantized once to bf16 and kept, bf16 matmul (oneDNN,
  AVX512-BF16 here): the fastest at large M, at 2 bytes per weight (4x the int4 form).
* `reference.int4_linear_reference`: the specification, slowest.

Example:
    >>> weight = PackedInt4Weight(packed, scales, zeros, group_size=128)
    >>> y = linear_int4pack(x, weight)        # fast, bf16 compute
    >>> y = linear_dequantized(x, weight)     # exact
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .names import CPU_INT4PACK
from .reference import SYMMETRIC_ZERO
from .weights import PackedInt4Weight

INT4PACK_FORM = CPU_INT4PACK  # the form name of `build_int4pack`: its backend's name
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)  # the group sizes torch's CPU int4pack kernel accepts
INT4PACK_ROW_MULTIPLE = 16  # it also needs N % 16 == 0: other layers are padded with zero-scale rows


def dequantize_fast(packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int) -> Tensor:
    """Float32 weights (N, K), bit-identical to reference.dequantize_int4 in fewer passes over memory."""
    rows, half = packed.shape
    codes = torch.empty(rows, half, 2, dtype=torch.float32, device=packed.device)  # (N, K/2, 2)
    codes[..., 0].copy_(packed & 0x0F)  # even k: low nibble
    codes[..., 1].copy_(packed >> 4)  # odd k: high nibble
    grouped = codes.view(rows, half * 2 // group_size, group_size)  # (N, G, g)
    zero = SYMMETRIC_ZERO if zeros is None else zeros.float().unsqueeze(-1)
    grouped.sub_(zero).mul_(scales.float().unsqueeze(-1))  # (code - zero) * scale, as the reference
    return codes.view(rows, half * 2)


def dequantized_form_name(dtype: torch.dtype) -> str:
    """The form name of the weight dequantized to `dtype` (shared by dequant_cached and cpu_bf16_cached)."""
    return f"dequantized:{dtype}"


def linear_dequantized(
    x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None, cache: bool = False
) -> Tensor:
    """Exact path: F.linear with the weight dequantized to x's dtype (kept with the layer if `cache`)."""

    def build(w: PackedInt4Weight) -> Tensor:
        return dequantize_fast(w.packed, w.scales, w.zeros, w.group_size).to(x.dtype)

    dense = weight.form(dequantized_form_name(x.dtype), build) if cache else build(weight)
    return F.linear(x, dense, None if bias is None else bias.to(x.dtype))


def linear_bf16_cached(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """bf16 matmul against the weight dequantized once to bf16 and kept (2 bytes per weight).

    For bf16 x this is exactly the reference. Other dtypes go through bf16 (tolerance as cpu_int4pack's,
    less the offset term): at large M it is the fastest CPU path, for 4x the int4 weight memory.
    """

    def build(w: PackedInt4Weight) -> Tensor:
        return dequantize_fast(w.packed, w.scales, w.zeros, w.group_size).to(torch.bfloat16)

    dense = weight.form(dequantized_form_name(torch.bfloat16), build)
    out = F.linear(x.to(torch.bfloat16), dense, None if bias is None else bias.to(torch.bfloat16))
    return out.to(x.dtype)


@dataclass(frozen=True)
class Int4PackForm:
    """torch's CPU int4pack tiles for one layer, made once at load time."""

    tiles: Tensor  # uint8, layout private to aten._convert_weight_to_int4pack_for_cpu
    scale_and_offset: Tensor  # bf16 (K // kernel_group_size, padded N, 2)
    kernel_group_size: int  # a size in INT4PACK_GROUP_SIZES dividing the layer's group size
    out_features: int  # N before padding


def int4pack_available() -> bool:
    """Whether this torch has the CPU int4pack ops and a vectorized kernel for this CPU."""
    ops = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    if not all(hasattr(torch.ops.aten, op) for op in ops):
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX512", "AVX2") or capability.startswith("SVE") or capability == "NEON"


def int4pack_kernel_group_size(group_size: int) -> Optional[int]:
    """The largest group size the int4pack kernel accepts that divides `group_size` (None if none)."""
    return next((size for size in INT4PACK_GROUP_SIZES if group_size % size == 0), None)


def build_int4pack(weight: PackedInt4Weight) -> Int4PackForm:
    """Repack a layer for `linear_int4pack` (scales and offsets repeated if its groups are larger)."""
    kernel_group = int4pack_kernel_group_size(weight.group_size)
    if kernel_group is None:
        raise ValueError(f"the CPU int4pack kernel needs a group size divisible by 32, got {weight.group_size}")
    if weight.packed.device.type != "cpu":
        raise ValueError(f"the CPU int4pack kernel needs CPU tensors, got {weight.packed.device}")
    repeat = weight.group_size // kernel_group
    scales = weight.scales.float()  # (N, G)
    zeros = torch.full_like(scales, SYMMETRIC_ZERO) if weight.zeros is None else weight.zeros.float()
    offsets = (SYMMETRIC_ZERO - zeros) * scales  # w = (code - 8) * scale + offset
    codes = torch.stack((weight.packed & 0x0F, weight.packed >> 4), dim=-1).view(weight.out_features, -1)
    pad = -weight.out_features % INT4PACK_ROW_MULTIPLE
    if pad:  # extra rows with scale 0 and offset 0 compute zeros; they are sliced off
        codes = F.pad(codes, (0, 0, 0, pad), value=SYMMETRIC_ZERO)
        scales, offsets = F.pad(scales, (0, 0, 0, pad)), F.pad(offsets, (0, 0, 0, pad))
    tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    pairs = torch.stack((scales, offsets), dim=-1).repeat_interleave(repeat, dim=1)  # (N', K / kernel_group, 2)
    scale_and_offset = pairs.transpose(0, 1).to(torch.bfloat16).contiguous()  # (K / kernel_group, N', 2)
    return Int4PackForm(tiles, scale_and_offset, kernel_group, weight.out_features)


def linear_int4pack(x: Tensor, weight: PackedInt4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """Fast path: torch's CPU int4pack kernel in bf16; returns x's dtype (tolerance, not bit-exact)."""
    return _int4pack_apply(x, weight.form(INT4PACK_FORM, build_int4pack), weight.in_features, bias)


def _int4pack_apply(x: Tensor, form: Int4PackForm, in_features: int, bias: Optional[Tensor]) -> Tensor:
    """x (..., K) -> (..., N) in x's dtype through the int4pack tiles of `form`."""
    rows = x.reshape(-1, in_features).to(torch.bfloat16).contiguous()  # (M, K)
    if rows.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], form.out_features)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, form.tiles, form.kernel_group_size, form.scale_and_offset)
    if out.shape[1] != form.out_features:
        out = out[:, : form.out_features]
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], form.out_features)


def int4pack_bound(weight: PackedInt4Weight, bias: Optional[Tensor] = None,
                   plain_rows: bool = False) -> Callable[[Tensor], Tensor]:
    """`linear_int4pack(·, weight, bias)` with the tiles fetched once: for one layer called many times.

    The returned function skips the cached-form lookup (and its stale-weight check) of each call:
    the weights must not be written while it is in use. bf16 x costs no cast at all. `plain_rows`:
    every x will be a contiguous 2-D (M, K) tensor, so the reshapes are skipped too.
    """
    form: Int4PackForm = weight.form(INT4PACK_FORM, build_int4pack)
    if not plain_rows or bias is not None or form.tiles.shape[0] != form.out_features:  # padded rows: slice
        return lambda x: _int4pack_apply(x, form, weight.in_features, bias)
    tiles, group, scale_and_offset = form.tiles, form.kernel_group_size, form.scale_and_offset
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu

    def run_rows(x: Tensor) -> Tensor:  # x (M, K) contiguous: no reshapes, nothing to slice or add
        return kernel(x.to(torch.bfloat16), tiles, group, scale_and_offset).to(x.dtype)

    return run_rows
