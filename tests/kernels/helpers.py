"""Layers, error bounds and the tolerance table shared by the kernel tests.

Every fast path is compared with reference.int4_linear_reference elementwise against the
standard forward-error bound of a dot product, so a tolerance scales with the data instead
of being one magic number:

    |y - y_ref| <= unit * (a * (|x| @ |W|.T + |bias|) + b * (|x| @ S.T)) + 2 * K * 2**-24 * (|x| @ |W|.T)

W is the exact fp32 dequantized weight, S[n, k] the scale of k's group, `unit` the unit
roundoff of the precision the backend computes in. The last term is fp32 accumulation in any
order, on both sides (gamma_K). TOLERANCES gives (unit, a, b) per (backend, dtype) with the
reason; backends not listed there (and cpu_bf16_cached with bf16 x) are bit-exact and are
compared bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from qat.kernels.reference import dequantize_int4, pack_int4
from torch import Tensor

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
BF16 = UNIT_ROUNDOFF[torch.bfloat16]


@dataclass(frozen=True)
class Tolerance:
    unit: float  # unit roundoff of the compute precision
    a: float  # multiples of unit * (|x| @ |W|.T): roundings proportional to the weight or the output
    b: float  # multiples of unit * (|x| @ S.T): weight errors proportional to the group's scale
    reason: str


TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    **{
        (kernel, dtype): Tolerance(
            UNIT_ROUNDOFF[dtype], 2.0, 0.0,
            "same fp32 dequant and same rounding of W to x's dtype as the reference (bitwise), products exact "
            "in fp32; only the fp32 summation order differs (last term), which can move the final rounding of "
            "y to x's dtype by one unit on either side: 2 units",
        )
        for kernel in ("triton_gemv_exact", "triton_gemm")
        for dtype in (torch.float16, torch.bfloat16)
    },
    **{
        (kernel, torch.float32): Tolerance(
            UNIT_ROUNDOFF[torch.float32], 2.0, 0.0,
            "fp32 weights are the reference's bit for bit; summation order only (last term) plus one rounding",
        )
        for kernel in ("triton_gemv_exact", "triton_gemm")
    },
    **{
        ("triton_gemv_unrounded", dtype): Tolerance(
            UNIT_ROUNDOFF[dtype], 2.0 if dtype == torch.float32 else 3.0, 0.0,
            "the reference's fp32 weights bit for bit, not rounded to x's dtype as the reference rounds them "
            "(1 unit of |x||W|; none for fp32 x); both round y (2 units); fp32 summation order (last term)",
        )
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
    },
    ("cpu_int4pack", torch.bfloat16): Tolerance(
        BF16, 3.0, 16.0,
        "torch's kernel dequantizes (code - 8) * scale + offset with scale and offset = (8 - zero) * scale "
        "rounded to bf16: |dW| <= unit * scale * (|code - 8| + |8 - zero|) <= 16 unit S (b = 16); the "
        "reference rounds W to bf16 (1 unit |W|), both round y to bf16 (2 units): a = 3",
    ),
    ("cpu_int4pack", torch.float32): Tolerance(
        BF16, 4.0, 16.0,
        "as for bf16 activations, plus x rounded to bf16 (1 unit |x||W|); the fp32 reference rounds nothing",
    ),
    ("cpu_int4pack", torch.float16): Tolerance(
        BF16, 5.0, 16.0,
        "computes in bf16: x to bf16 (1), W offsets (b = 16), y to bf16 then fp16 (2), and the reference's own "
        "fp16 roundings of W and y (< 2 bf16 units together)",
    ),
    ("cpu_bf16_cached", torch.float32): Tolerance(
        BF16, 3.0, 0.0, "bf16 matmul: x, W and y each rounded to bf16 once (1 unit of |x||W| each)",
    ),
    ("cpu_bf16_cached", torch.float16): Tolerance(
        BF16, 4.0, 0.0, "x, W, y rounded to bf16 (3 units), y then to fp16 and the reference's fp16 roundings (< 1)",
    ),
}


def make_layer(
    n: int,
    k: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    zero_points: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Random packed codes, scales in [0.001, 0.021) and optional zero points for an (n, k) layer."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(n, k // group_size, generator=generator) * 0.02 + 0.001).to(scale_dtype)
    zeros = torch.randint(0, 16, (n, k // group_size), dtype=torch.uint8, generator=generator) if zero_points else None
    return pack_int4(codes), scales, zeros


def error_bound(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    group_size: int,
    bias: Optional[Tensor],
    tolerance: Tolerance,
) -> Tensor:
    """The elementwise bound in the module docstring, in float64, shaped like y."""
    weights = dequantize_int4(packed, scales, zeros, group_size).double()  # (N, K)
    group_scales = scales.double().repeat_interleave(group_size, dim=1)  # (N, K)
    magnitude = x.double().abs() @ weights.abs().T  # (..., N)
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    scale_term = x.double().abs() @ group_scales.T
    accumulation = 2 * x.shape[-1] * UNIT_ROUNDOFF[torch.float32] * magnitude
    return tolerance.unit * (tolerance.a * magnitude + tolerance.b * scale_term) + accumulation


def assert_within_bound(actual: Tensor, expected: Tensor, bound: Tensor, label: str) -> None:
    """|actual - expected| <= bound elementwise, both finite; the message names the worst element."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, label
    assert torch.isfinite(actual).all(), f"{label}: non-finite output"
    error = (actual.double() - expected.double()).abs()
    excess = error - bound
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{label}: error {error.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} at flat index {worst}"
    )


def assert_bitwise_equal(actual: Tensor, expected: Tensor, label: str = "") -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, label
    views = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    mismatched = (actual.contiguous().view(views[actual.dtype]) != expected.contiguous().view(views[actual.dtype]))
    assert int(mismatched.sum()) == 0, f"{label}: {int(mismatched.sum())} of {actual.numel()} values differ"


def make_exact_case(
    n: int, k: int, group_size: int, rows: int, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, packed, scales, zeros whose products and fp32 sums are all exact: any kernel must then agree
    with the reference bit for bit, so a single misplaced code or scale fails (unlike the bounds above).

    Scales are powers of two (2^-6 .. 2^-3), activations small integers (|x| <= 8), so every weight
    (code - zero) * scale is exact in bf16/fp16, every product is a multiple of 2^-6 and every partial
    sum stays below 2^17: exact in fp32 in any order. Only the final rounding of y remains, and both
    sides round the same exact value.
    """
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    exponents = torch.randint(3, 7, (n, k // group_size), generator=generator)
    scales = torch.pow(2.0, -exponents.double()).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // group_size), dtype=torch.uint8, generator=generator)
    x = torch.randint(-8, 9, (rows, k), generator=generator).to(dtype)
    return x, pack_int4(codes), scales, zeros


# The blocked path (kernels/blocked.py): its tiles are the reference's weights bit for bit (K permuted),
# rounded once to the GEMM dtype as the reference rounds them to x's dtype; what differs is the GEMM.
TOLERANCES |= {
    ("cpu_blocked", torch.float32): Tolerance(
        UNIT_ROUNDOFF[torch.float32], 2.0, 0.0,
        "weights bitwise the reference's; only the fp32 GEMM's summation order differs (last term) plus the "
        "final rounding of y on either side",
    ),
    ("cpu_blocked", torch.bfloat16): Tolerance(
        BF16, 2.0, 0.0,
        "bf16 weights bitwise the reference's (same fp32 value, same single rounding); fp32 accumulation in "
        "another order (last term) can move y's rounding to bf16 by one unit on either side: 2 units",
    ),
    ("cpu_blocked", torch.float16): Tolerance(
        UNIT_ROUNDOFF[torch.float16], 3.0, 0.0,
        "GEMM in fp32 on exact weights; the reference rounds W to fp16 (1 unit) and y to fp16, as we do (2)",
    ),
    ("cpu_blocked_bf16", torch.float32): Tolerance(
        BF16, 3.0, 0.0, "bf16 GEMM: x, W and y each rounded to bf16 once (as cpu_bf16_cached)",
    ),
    ("cpu_blocked_bf16", torch.float16): Tolerance(
        BF16, 4.0, 0.0, "x, W, y rounded to bf16 (3 units), y then to fp16 and the reference's fp16 roundings (< 1)",
    ),
    ("cpu_blocked_bf16", torch.bfloat16): Tolerance(
        BF16, 2.0, 0.0, "for bf16 x it is cpu_blocked",
    ),
}

# The small-M kernel (kernels/small_m.py): the weights are cpu_bf16_cached's bit for bit ((code - zero) * scale in
# fp32, one rounding to bf16), x is taken in bf16, products are exact and summed in fp32 (vdpbf16ps), and the fp32
# result is cast to x's dtype.
TOLERANCES |= {
    ("cpu_small_m", torch.bfloat16): Tolerance(
        BF16, 2.0, 0.0,
        "bf16 weights and x bitwise the reference's, exact products, fp32 sums in another order (last term); "
        "the final rounding of y to bf16 can land one unit to either side: 2 units",
    ),
    ("cpu_small_m", torch.float32): Tolerance(
        BF16, 2.0, 0.0, "x and W each rounded to bf16 once (1 unit of |x||W| each); y stays fp32",
    ),
    ("cpu_small_m", torch.float16): Tolerance(
        BF16, 4.0, 0.0, "x and W rounded to bf16 (2 units), y to fp16 and the reference's fp16 roundings of W and y "
        "(each under a bf16 unit)",
    ),
}


def int8_activation_bound(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                          bias: Optional[Tensor], sx: Tensor, block: int) -> Tensor:
    """The bound of cpu_int8_act (kernels/int8_act.py) against the reference, elementwise in float64, shaped like y.

    x rounds to sx * q with |x - sx q| <= sx / 2 per element, so the product moves by at most
    sum_b sx_b / 2 * sum_{k in b} |W[n, k]|. On top: the reference rounds W and y to x's dtype and the
    kernel rounds y (3 units of x's dtype times |x||W| + |bias|), and both sum in fp32 in their own order
    (2 K units of fp32: the accumulation term of `error_bound`); sx q <= |x| + sx / 2 keeps the kernel's
    own magnitudes within that of x plus the rounding term.
    """
    weights = dequantize_int4(packed, scales, zeros, group_size).double().abs()
    half_steps = (sx.double() / 2).repeat_interleave(block, dim=1)  # (M, K)
    rounding = half_steps @ weights.T
    unit = UNIT_ROUNDOFF[x.dtype if x.dtype in UNIT_ROUNDOFF else torch.float32]
    reference = error_bound(x, packed, scales, zeros, group_size, bias, Tolerance(unit, 3.0, 0.0, "see above"))
    return rounding * (1 + 2 * x.shape[-1] * UNIT_ROUNDOFF[torch.float32]) + reference


# The AVX2 float path (kernels/gemv_f32.py): per group sum (code - zero) * x in fp32 (code - zero exact, FMAs), then
# times the scale in one FMA into y; x of any dtype is taken in fp32 exactly and y is cast to x's dtype once.
TOLERANCES |= {
    ("cpu_gemv_f32", torch.float32): Tolerance(
        UNIT_ROUNDOFF[torch.float32], 2.0, 0.0,
        "the reference rounds each weight (code - zero) * scale once (1 unit of |x||W|), this kernel rounds "
        "nothing before its sums; sums in another order (last term, the scale applied per group inside it); "
        "1 unit of margin for y's rounding",
    ),
    ("cpu_gemv_f32", torch.bfloat16): Tolerance(
        BF16, 3.0, 0.0, "the reference rounds W to bf16 (1 unit) and y to bf16, as this kernel rounds y (2 units)",
    ),
    ("cpu_gemv_f32", torch.float16): Tolerance(
        UNIT_ROUNDOFF[torch.float16], 3.0, 0.0,
        "the reference rounds W to fp16 (1 unit) and y to fp16, as this kernel rounds y (2 units)",
    ),
}
