"""ONNX Runtime's com.microsoft MatMulNBits: its tensor layout from our codes, and a torch op that exports to it.

MatMulNBits (bits=4) computes Y = A @ W.T with, for output row n and input k,

    W[n, k] = (code(B, n, k) - zero[n, k // block]) * scales[n, k // block]
    B            uint8 (N, k_blocks, block / 2)   codes of row n, block b: two per byte, low nibble first
    scales       float32 (N, k_blocks)
    zero_points  uint8 (N, ceil(k_blocks / 2))    two 4-bit zeros per byte, low nibble first; absent = 8

Our stored codes u and zeros map onto it unchanged (symmetric signed 4-bit layers: zero 8, no input).
Codes of 2 and 3 bits are written into the same 4-bit container: a code in [0, 2^b) with its zero
in the same range is the same number in 4 bits, so W is exact (the file is no smaller than 4 bits).
A group of size g becomes g / block blocks that repeat the group's scale and zero, with
block = the largest power of two dividing g, at most 128 (ONNX Runtime's kernels take 16..256);
a layer with a single group (per-channel) whose K is no multiple of 16 gets one block of
the next power of two, its tail padded with the row's zero code (the padding meets no input).

`matmul_nbits` is a torch custom op computing exactly that in float32 (dequantize, then
`F.linear`); `torch.onnx.export(..., custom_translation_table=TRANSLATIONS)` writes it as
one MatMulNBits node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_BLOCK = 128
MIN_BLOCK = 16


@dataclass(frozen=True)
class NBitsLayout:
    """How one layer's groups map to MatMulNBits blocks."""

    k: int
    n: int
    block_size: int
    blocks: int  # k_blocks = ceil(K / block_size)
    repeat: int  # blocks per stored group


def choose_layout(k: int, group_size: int) -> Optional[NBitsLayout]:
    """The block layout for a (N, K) weight with `group_size`, or None when MatMulNBits cannot hold it."""
    if group_size % MIN_BLOCK == 0:
        block = MIN_BLOCK
        while group_size % (block * 2) == 0 and block * 2 <= MAX_BLOCK:
            block *= 2
        return NBitsLayout(k, 0, block, k // block, group_size // block)
    if group_size == k and k <= 256:  # one group: one block of the next power of two, padded
        block = MIN_BLOCK
        while block < k:
            block *= 2
        return NBitsLayout(k, 0, block, 1, 1)
    return None


def nbits_tensors(codes: Tensor, scales: Tensor, zeros: Tensor, layout: NBitsLayout,
                  default_zero: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(B, scales, zero_points or None) from codes uint8 (N, K), scales (N, G), zeros uint8 (N, G)."""
    n, k = codes.shape
    padded_k = layout.blocks * layout.block_size
    if padded_k != k:  # pad each row with its own zero code: the padding dequantizes to 0
        codes = torch.cat([codes, zeros[:, :1].expand(n, padded_k - k)], dim=1)
    b = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, layout.blocks, layout.block_size // 2)
    block_scales = scales.float().repeat_interleave(layout.repeat, dim=1).contiguous()
    if default_zero:
        return b.contiguous(), block_scales, None
    block_zeros = zeros.repeat_interleave(layout.repeat, dim=1)  # (N, k_blocks)
    if block_zeros.shape[1] % 2:
        block_zeros = torch.cat([block_zeros, torch.zeros_like(block_zeros[:, :1])], dim=1)
    packed_zeros = block_zeros[:, 0::2] | (block_zeros[:, 1::2] << 4)
    return b.contiguous(), block_scales, packed_zeros.contiguous()


def dequantize_nbits(b: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int) -> Tensor:
    """float32 W (N, K) from MatMulNBits tensors: the operator's definition, in PyTorch."""
    n, blocks, half = b.shape
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(n, blocks, 2 * half).float()
    if zero_points is None:
        zero = torch.full((n, blocks), 8.0)
    else:
        zero = torch.stack((zero_points & 0x0F, zero_points >> 4), dim=-1).reshape(n, -1)[:, :blocks].float()
    weights = (codes - zero.unsqueeze(-1)) * scales.unsqueeze(-1)
    return weights.reshape(n, blocks * 2 * half)[:, :k]


@torch.library.custom_op("qat_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, n: int,
                 block_size: int, accuracy_level: int) -> Tensor:
    """x @ W.T with W from MatMulNBits tensors (float32); exports as one com.microsoft MatMulNBits node."""
    return F.linear(x, dequantize_nbits(b, scales, zero_points, k).to(x.dtype))


@matmul_nbits.register_fake
def _matmul_nbits_shape(x: Tensor, b: Tensor, scales: Tensor, zero_points: Optional[Tensor], k: int, n: int,
                        block_size: int, accuracy_level: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _register_schema() -> None:
    """Tell the onnx package MatMulNBits' signature (ONNX Runtime's contrib ops are not in onnx)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional), param("g_idx", "T4", param_option=optional),
                param("bias", "T1", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")]
        + [OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


def translations() -> dict:
    """The `custom_translation_table` for torch.onnx.export: our op -> a MatMulNBits node."""
    import onnxscript

    _register_schema()
    microsoft = onnxscript.values.Opset("com.microsoft", 1)

    def to_matmul_nbits(x, b, scales, zero_points, k: int, n: int, block_size: int, accuracy_level: int):
        return microsoft.MatMulNBits(x, b, scales, zero_points, K=k, N=n, bits=4, block_size=block_size,
                                     accuracy_level=accuracy_level)

    return {torch.ops.qat_onnx.matmul_nbits.default: to_matmul_nbits}
