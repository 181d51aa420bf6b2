"""`qat export FILE --to compressed-tensors -o FOLDER`: a Hugging Face model folder in the
compressed-tensors `pack-quantized` format, which transformers (with the `compressed-tensors`
package) loads and vLLM serves.

For each quantized Linear layer `<layer>` of the qat file (tensors in `model.safetensors`):

    <layer>.weight_packed      int32 (N, ceil(K / 8))  code k of a row at bits 4 (k % 8) of word k // 8, as q + 8
    <layer>.weight_scale       float32 (N, G)          our scales, widened exactly to float32
    <layer>.weight_zero_point  int32 (ceil(N / 8), G)  asymmetric layers: zero - 8, packed 8 per word along N
    <layer>.weight_shape       int64 [N, K]

Our stored codes u are already "q + 8" for signed 4-bit layers, so `weight_packed` holds the
very bytes of our `weight_packed` (read as little-endian int32 words; rows padded to a
multiple of 8 codes). compressed-tensors dequantizes `(q - zero_point) * scale` in the
scale's dtype: float32 scales make that `(u - zero) * scale` in float32, our formula bit for
bit (the tests compare transformers' logits with qat.load's for equality).

One config group covers every quantized layer, since transformers (5.23) decompresses all
dense layers with the first group's scheme: its group size is the gcd of the layers' group
sizes (a layer with larger groups repeats each scale, exactly), `channel` when every layer
has one group per row; zero points are written for every layer when any layer needs them
(asymmetric or unsigned codes; symmetric layers then store zero 8). Float Linear layers go
to `ignore`. Zero points are packed along N as compressed-tensors' own compressor does;
transformers' `run_compressed=True` CPU path (5.23) expects them unpacked and refuses such
files, so load with `CompressedTensorsConfig(run_compressed=False)` (symmetric files load either way).

Refused (ConversionError naming the layer): bits other than 4, Conv2d layers, static input
quantization (the format would need another scheme), architectures not given as a Hugging Face
config. Quantized Embedding layers are written as their exact dequantized float table; a quantized
output head tied to them (SmolLM2) is written packed like any Linear, and the config's
`tie_word_embeddings` is set to false, since the two now differ in form (not in value).

Example:
    >>> export_compressed_tensors("llama.safetensors", "llama-int4")    # then AutoModelForCausalLM.from_pretrained
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from qat.export.architecture import build_architecture
from qat.export.format import layer_tensor
from qat.export.golden import KEY_GOLDEN, encode_golden
from qat.export.manifest import Manifest, read_manifest
from qat.export.pack import dequantize_weight, stored_codes
from qat.export.reader import read_header, read_tensors
from qat.export.spec import LayerSpec
from qat.export.targets.errors import ConversionError, refuse

TARGET = "compressed-tensors"


@dataclass
class CompressedTensorsReport:
    """What was written: the folder, quantized layers per config group, float layers."""

    path: str
    quantized: list[str]
    scheme: dict
    dense: list[str] = field(default_factory=list)  # quantized embeddings written as exact float tables

    def __str__(self) -> str:
        s = self.scheme
        return (f"{self.path}: {len(self.quantized)} pack-quantized layer(s) ({s['strategy']}, group_size "
                f"{s['group_size']}, {'symmetric' if s['symmetric'] else 'with zero points'}), "
                f"{len(self.dense)} quantized embedding(s) written as exact float tables")


def pack_words(codes: Tensor) -> Tensor:
    """int32 (R, ceil(C / 8)) from uint8 codes (R, C) in [0, 15]: code c at bits 4 (c % 8) of word c // 8."""
    rows, columns = codes.shape
    padded = -(-columns // 8) * 8
    if padded != columns:
        codes = torch.cat([codes, torch.zeros(rows, padded - columns, dtype=torch.uint8)], dim=1)
    as_bytes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (R, padded / 2), low nibble first
    return as_bytes.contiguous().view(torch.int32)  # little-endian words


def _check_layer(layer: str, spec: LayerSpec) -> None:
    if spec.type != "Linear":
        raise refuse(TARGET, layer, f"quantized {spec.type} layers have no pack-quantized form here")
    if spec.input is not None:
        raise refuse(TARGET, layer, "static input quantization has no place in a weight-only pack-quantized scheme")
    if spec.weight.bits != 4:
        raise refuse(TARGET, layer, f"{spec.weight.bits}-bit weights; this converter writes 4-bit pack-quantized only")


def _zeros(spec: LayerSpec, stored: dict[str, Tensor]) -> Tensor:
    zeros = stored.get("weight_zeros")
    if zeros is None:
        zeros = torch.full((spec.weight.rows, spec.weight.groups), spec.weight.implied_zero, dtype=torch.uint8)
    return zeros


def common_scheme(specs: dict[str, LayerSpec], symmetric: bool) -> dict:
    """One weight scheme for every layer (transformers decompresses dense layers with a single scheme):
    group size = the gcd of the layers' group sizes (a layer's group repeats its scale g / gcd times,
    exactly), 'channel' when every layer has one group per row; zero points when any layer needs them."""
    group_size = math.gcd(*(spec.weight.group_size for spec in specs.values()))
    per_channel = all(spec.weight.groups == 1 for spec in specs.values())
    return {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else group_size, "dynamic": False, "actorder": None,
            "observer": None, "block_structure": None, "observer_kwargs": {}}


def _layer_tensors(layer: str, spec: LayerSpec, stored: dict[str, Tensor], scheme: dict) -> dict[str, Tensor]:
    w = spec.weight
    repeat = 1 if scheme["strategy"] == "channel" else w.group_size // scheme["group_size"]
    tensors = {
        "weight_packed": pack_words(stored_codes(w, stored)),
        # exact: fp16 / bf16 widen to float32 without rounding; a group's scale repeats over its sub-groups
        "weight_scale": stored["weight_scales"].float().repeat_interleave(repeat, dim=1).contiguous(),
        "weight_shape": torch.tensor([w.rows, w.columns], dtype=torch.int64),
    }
    if not scheme["symmetric"]:
        zeros = _zeros(spec, stored).repeat_interleave(repeat, dim=1)
        tensors["weight_zero_point"] = pack_words(zeros.t().contiguous()).t().contiguous()  # packed along N
    return {layer_tensor(layer, name): t for name, t in tensors.items()}


def _read_file(path: str) -> tuple[Manifest, dict[str, Tensor]]:
    header = read_header(path)
    manifest = read_manifest(header)
    architecture = manifest.architecture or {}
    if "hf_config" not in architecture:
        raise ConversionError(f"cannot convert to {TARGET}: {path} records architecture "
                              f"{json.dumps(architecture)[:80]}; only Hugging Face configs "
                              "({'hf_config': config.to_dict()}) make a Hugging Face folder")
    return manifest, dict(read_tensors(header, manifest.checksums))  # every SHA-256 checked


def export_compressed_tensors(path: str | os.PathLike, out: str | os.PathLike) -> CompressedTensorsReport:
    """Write the qat file `path` (a Hugging Face architecture) as a compressed-tensors folder `out`."""
    path, folder = os.fspath(path), Path(out)
    manifest, stored = _read_file(path)
    skeleton = build_architecture(manifest.architecture, path)
    persistent = set(skeleton.state_dict())
    tensors, dense, quantized = {}, [], {}
    owned = manifest.layer_tensor_names()
    layer_stored = {layer: {suffix: stored[manifest.tied.get(name, name)]
                            for suffix in spec.tensor_shapes() for name in [layer_tensor(layer, suffix)]}
                    for layer, spec in manifest.layers.items()}  # a tied table is stored once, under its owner
    for layer, spec in manifest.layers.items():
        if spec.weight is not None and spec.type == "Embedding" and spec.input is None:
            weight = dequantize_weight(spec.weight, layer_stored[layer])
            tensors[layer_tensor(layer, "weight")] = weight.to(getattr(torch, spec.weight.dtype))
            dense.append(layer)
            continue
        if spec.weight is None:
            raise refuse(TARGET, layer, "static input quantization without weight quantization")
        _check_layer(layer, spec)
        quantized[layer] = spec
    if not quantized:
        raise ConversionError(f"cannot convert to {TARGET}: {path} has no quantized Linear layer")
    symmetric = all(bool((_zeros(spec, layer_stored[name]) == 8).all()) for name, spec in quantized.items())
    scheme = common_scheme(quantized, symmetric)
    for layer, spec in quantized.items():
        tensors.update(_layer_tensors(layer, spec, layer_stored[layer], scheme))
    tensors.update({name: t for name, t in stored.items() if name not in owned and name in persistent})
    config = dict(manifest.architecture["hf_config"])
    if config.get("tie_word_embeddings") and "lm_head" in quantized:
        config["tie_word_embeddings"] = False  # the table as exact floats, the head packed: equal weights, two forms
    group = {"targets": [f"re:^{re.escape(layer)}$" for layer in quantized], "weights": scheme,
             "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": group}, "ignore": dense + _float_linears(skeleton, manifest),
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    metadata = {"format": "pt"}
    if manifest.golden is not None:
        metadata[KEY_GOLDEN] = encode_golden(manifest.golden)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors",
                                metadata=metadata)
    return CompressedTensorsReport(os.fspath(folder), list(quantized), scheme, dense)


def _float_linears(skeleton: torch.nn.Module, manifest: Manifest) -> list[str]:
    """Linear layers of the architecture the file does not quantize (compressed-tensors must skip them)."""
    return [name for name, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in manifest.layers]
