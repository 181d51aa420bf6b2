"""torchao's int4 weight-only quantization as a peer of qat, on a Hugging Face causal LM, on CPU.

The path a PyTorch user takes without qat: `torchao.quantization.quantize_` with an int4 weight-only,
per-group config, post-training (`ptq`) or after torchao's own QAT flow (`qat_prepare`, train,
`qat_convert`). The model stays an eager PyTorch module, run in bfloat16 by default (see below).
SmolLM2-135M, one (1, 256) forward, 2 threads, shared machine: float32 0.59 s, bfloat16 float 3.6 s,
int4 in bfloat16 0.96 s (best of 5; int4 in float32 took 70-110 s).

Which config runs on CPU (torchao 0.18.0, torch 2.13 CPU build, no mslk):

    PrototypeInt4WeightOnlyConfig (torchao.prototype.quantization.int4)   works, used here
        weights become Int4OpaqueTensor: asymmetric uint4 codes packed two to a byte for
        aten._weight_int4pack_mm_for_cpu, float scales and float zero points ("tinygemm" qparams:
        per-group min / max), in the weight's dtype. float32 runs but is slow: the CPU int4 matmul
        took 30x the dense float32 matmul (SmolLM2 shapes, M = 256), while in bfloat16 it is ~3x
        faster than dense bfloat16. So `ptq` and `qat_convert` cast the model to bfloat16 first
        (`dtype=`; pass torch.float32 or None to keep float32).
        group_size must be 32, 64 or 128 and divide in_features; anything else is skipped with
        only a log line, so `ptq` and `qat_prepare` check first and raise.
        int4_choose_qparams_algorithm="hqq" works too (same storage, HQQ-chosen scales and zeros).
    Int4WeightOnlyConfig (the stable int4 config; its 0.18 packing formats are all GPU or XPU / NPU):
        plain (default), preshuffled      ImportError: Requires mslk >= 1.0.0
        tile_packed_to_4d (bf16 weights)  AssertionError: Torch not compiled with CUDA enabled
        plain_int32 (bf16 weights)        NotImplementedError: Int4PlainInt32Tensor does not support device 'cpu' yet.
        plain + hqq                       AssertionError: Int4ChooseQParamsAlgorithm.HQQ is not supported by
                                          packing format Int4PackingFormat.PLAIN, ...
    IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g), mapping_type=...)
        runs on CPU, but as IntxUnpackedToInt8Tensor: one int4 code per int8 byte, dequantized to
        float before every matmul; its opaque (packed CPU kernel) formats are refused:
        ValueError: Unsupported packing format: opaque_aten_kleidiai (likewise opaque_torchao_auto).
        Not a packed int4 model, so not used.
    Int8DynamicActivationIntxWeightConfig: quantizes activations too, not weight-only; not used.

QAT: `QATConfig(Int4WeightOnlyConfig(group_size=g), step="prepare")` swaps each nn.Linear for a
FakeQuantizedLinear whose weight fake quantizer (Int4WeightFakeQuantizer, bf16-activation variant)
reproduces the tinygemm min / max asymmetric grid in float32, with a straight-through round; no
activation fake quantization. Its matching convert, `QATConfig(Int4WeightOnlyConfig(...), step="convert")`,
fails on CPU (ImportError: Requires mslk >= 1.0.0). QATConfig accepts no PrototypeInt4WeightOnlyConfig
base (ValueError: Unexpected base config: PrototypeInt4WeightOnlyConfig(...)). So `qat_convert` runs
`QATConfig(step="convert")` without a base config (back to plain nn.Linear, trained weights kept) and
then the CPU config above on the same layers: the same grid, so the int4 model reproduces the
fake-quantized one (tiny Llama, logits: 2.4e-7 relative converted in float32, 8e-3 in bfloat16, about
the 6e-3 the float model itself moves in bfloat16). The IntxWeightOnlyConfig QAT base
would convert on CPU but accepts only symmetric mapping and stores unpacked int8 codes.

Tied output head: quantize_ quantizes `lm_head` like any nn.Linear, which unties it. The token
embedding keeps the float table (torchao's int4 CPU tensor has no embedding lookup) and the head
holds an int4 copy, so `weight_bytes` counts the float table plus the packed head. During QAT the
head stays tied (FakeQuantizedLinear shares the Parameter): the embedding reads the float weights
the head fake-quantizes, and training updates both through the one tensor.

Example:
    >>> settings = ptq(model, group_size=64)          # model now bfloat16, every nn.Linear int4
    >>> logits = model(input_ids=ids).logits
    >>> weight_bytes(model)
"""

from __future__ import annotations

from typing import Optional

import torch
import torchao
from torch import Tensor, nn
from torchao.prototype.quantization.int4 import Int4OpaqueTensor, PrototypeInt4WeightOnlyConfig
from torchao.quantization import Int4WeightOnlyConfig, quantize_
from torchao.quantization.qat import FakeQuantizedLinear, QATConfig
from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

ALGORITHMS = {"minmax": Int4ChooseQParamsAlgorithm.TINYGEMM, "hqq": Int4ChooseQParamsAlgorithm.HQQ}
GROUP_SIZES = (32, 64, 128)  # the only ones Int4OpaqueTensor.from_hp accepts


def default_group_size() -> int:
    """The group size torchao's CPU int4 weight-only config uses when none is given (128)."""
    return PrototypeInt4WeightOnlyConfig().group_size


def _cpu_config(group_size: int, algorithm: str = "minmax") -> PrototypeInt4WeightOnlyConfig:
    """The CPU int4 weight-only config; the global inductor settings are left alone (nothing is compiled)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    return PrototypeInt4WeightOnlyConfig(
        group_size=group_size, int4_choose_qparams_algorithm=ALGORITHMS[algorithm], set_inductor_config=False
    )


def _describe(config: PrototypeInt4WeightOnlyConfig, dtype: torch.dtype, model: nn.Module) -> str:
    head = " incl. the untied lm_head" if hasattr(model, "lm_head") else ""
    return (
        f"torchao {torchao.__version__} quantize_(model, PrototypeInt4WeightOnlyConfig(group_size={config.group_size}, "
        f"int4_choose_qparams_algorithm='{config.int4_choose_qparams_algorithm.value}', set_inductor_config=False)) "
        f"on every nn.Linear{head}; Int4OpaqueTensor; {str(dtype).removeprefix('torch.')} "
        "activations; embedding left float"
    )


def _cast(model: nn.Module, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Cast `model` in place to `dtype` (None: leave it); return the dtype it runs in."""
    if dtype is not None:
        model.to(dtype)
    return next(model.parameters()).dtype


def _check_linears(model: nn.Module, group_size: int) -> None:
    """Raise unless every nn.Linear can take `group_size`: torchao would skip the others silently."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"torchao's CPU int4 tensor takes group sizes {GROUP_SIZES}, got {group_size}")
    misfits = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % group_size]
    if misfits:
        raise ValueError(
            f"group_size {group_size} does not divide in_features of {misfits[:3]} ({len(misfits)} layers)"
        )


def _check_all_int4(model: nn.Module) -> None:
    """Raise if quantize_ left any nn.Linear in float."""
    left = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m.weight, Int4OpaqueTensor)
    ]
    if left:
        raise RuntimeError(f"torchao left {len(left)} nn.Linear layers in float, e.g. {left[:3]}")


def ptq(
    model: nn.Module, group_size: int, algorithm: str = "minmax", dtype: Optional[torch.dtype] = torch.bfloat16
) -> str:
    """Quantize every nn.Linear of `model` in place to int4 weight-only, per group; return the settings.

    `algorithm`: "minmax" (torchao's default per-group min / max, asymmetric) or "hqq" (torchao's
    half-quadratic search of scales and zero points, same storage). The model is cast to `dtype`
    first (None: kept), since its scales, zeros, activations and logits all follow the model's dtype.
    """
    config = _cpu_config(group_size, algorithm)
    _check_linears(model, group_size)
    dtype = _cast(model, dtype)
    quantize_(model, config)
    _check_all_int4(model)
    return _describe(config, dtype, model)


def _inner_tensors(tensor: Tensor) -> list[Tensor]:
    """The plain tensors a (possibly nested) tensor subclass stores, through `__tensor_flatten__`."""
    if type(tensor) in (Tensor, nn.Parameter):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _inner_tensors(getattr(tensor, name))]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter as stored: packed int4 codes, scales and zeros, float tensors; shared ones once."""
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for parameter in model.parameters():  # a tied Parameter is yielded once
        for inner in _inner_tensors(parameter):
            key = (inner.untyped_storage().data_ptr(), inner.storage_offset(), inner.numel())
            if key not in seen:
                seen.add(key)
                total += inner.numel() * inner.element_size()
    return total


def _qat_base(group_size: int) -> Int4WeightOnlyConfig:
    """The PTQ config QATConfig derives its fake quantizer from: tinygemm min / max grid, weights only."""
    return Int4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def qat_prepare(model: nn.Module, group_size: int) -> None:
    """Swap every nn.Linear for torchao's FakeQuantizedLinear (int4 per-group weights, float activations).

    Gradients reach the float weights through a straight-through round; train with any optimizer
    over model.parameters(), then call `qat_convert` with the same group size.
    """
    _check_linears(model, group_size)
    quantize_(model, QATConfig(_qat_base(group_size), step="prepare"))


def qat_convert(model: nn.Module, group_size: int, dtype: Optional[torch.dtype] = torch.bfloat16) -> str:
    """Turn the fake-quantized layers of `qat_prepare` into real int4 layers (`ptq`'s minmax config).

    The trained model is cast to `dtype` first, as in `ptq`; returns the settings string. Before a cast,
    each weight is replaced by its fake-quantized value (a new Parameter, so a tied head unties from
    the embedding as it would anyway): group min / max stay on the grid and the codes survive the
    cast, where casting the raw weights flips codes near rounding boundaries (tiny Llama, float32
    training, bfloat16 convert: logits 5.4e-2 off the fake-quantized model that way).
    """
    names = {name for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    if not names:
        raise ValueError("no FakeQuantizedLinear in the model: call qat_prepare first")
    for name in names:
        prepared = model.get_submodule(name).weight_fake_quantizer.config.group_size
        if prepared != group_size:
            raise ValueError(f"{name} was prepared with group_size {prepared}, not {group_size}")
    if dtype is not None and dtype != next(model.parameters()).dtype:
        with torch.no_grad():
            for name in names:
                layer = model.get_submodule(name)
                layer.weight = nn.Parameter(layer.weight_fake_quantizer(layer.weight))
    quantize_(model, QATConfig(step="convert"))  # back to nn.Linear, trained weights kept
    dtype = _cast(model, dtype)
    config = _cpu_config(group_size)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    _check_all_int4(model)
    return "after QATConfig(Int4WeightOnlyConfig(...), step='prepare') / QATConfig(step='convert'): " + _describe(
        config, dtype, model
    )
