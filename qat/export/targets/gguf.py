"""`qat export FILE --to gguf -o model.gguf`: a GGUF file for llama.cpp, Llama architectures only.

Quantized layers become GGML blocks of 32 weights written from our codes directly
(re-quantizing from float would change the grid), so the group size must be a multiple of 32:

    Q4_0  (every group's zero is 8)  block = fp16 d, 16 bytes qs; byte j = q[j] | q[j + 16] << 4;
          w = d (q - 8). d = our scale, q = our stored code: exact when the scales are
          float16 values (float16 scales always; bf16 / fp32 scales are checked and refused if not).
    Q4_1  (other zeros)              block = fp16 d, fp16 m, qs; w = d q + m with d = scale and
          m = float16(-scale * zero): the one rounding of this format. |error| <= 2^-11 |scale * zero|,
          at most 0.8 % of a quantization step (zero <= 15); exact when zero = 0.

Llama's q_proj / k_proj rows are permuted as llama.cpp expects (its rotary embedding pairs
dimensions (i, i + d/2) of a head as (2i, 2i + 1)); rows move whole, with their scales.
Norms and float layers are written as F32. The golden data goes into the key `qat.golden`.

Tied embeddings (SmolLM2): the shared table is written once, as `token_embd`; with no
`output.weight` llama.cpp computes the logits from it, as the tied model does.

The tokenizer comes from the model's own GGUF source, or `vocab=` another GGUF file
(`qat.export.targets.gguf_vocab`); without one the file runs token ids only. The suite runs
llama.cpp (`llama-cpp-python`, `make llama`) on the result when it is installed.

Example:
    >>> export_gguf("llama.safetensors", "llama-q4.gguf")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from qat.export.architecture import build_architecture
from qat.export.format import layer_tensor
from qat.export.golden import KEY_GOLDEN, encode_golden
from qat.export.pack import stored_codes
from qat.export.spec import LayerSpec
from qat.export.targets.compressed_tensors import _read_file
from qat.export.targets.errors import ConversionError, refuse
from qat.export.targets.gguf_vocab import tokenizer_fields

TARGET = "gguf"
BLOCK = 32
LLAMA_TYPES = ("llama",)


@dataclass
class GGUFReport:
    """What was written: the file and the GGML type of each tensor."""

    path: str
    types: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "none (token ids only)"

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for kind in self.types.values():
            counts[kind] = counts.get(kind, 0) + 1
        tensors = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        return f"{self.path}: {tensors} tensor(s); tokenizer: {self.tokenizer}"


def permute_rows(rows: Tensor, heads: int) -> Tensor:
    """llama.cpp's Q/K row order: within each head, rows (i, i + d/2) become (2i, 2i + 1)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def q4_blocks(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> tuple[np.ndarray, str]:
    """GGML bytes (N, K / 32 * bytes_per_block) and the type ('Q4_0' / 'Q4_1') of codes uint8 (N, K)."""
    n, k = codes.shape
    repeat = group_size // BLOCK
    blocks = codes.reshape(n, k // BLOCK, BLOCK)
    qs = (blocks[..., :16] | (blocks[..., 16:] << 4)).numpy()  # (N, B, 16)
    d = scales.half().repeat_interleave(repeat, dim=1)  # (N, B)
    parts = [d.numpy().view(np.uint8).reshape(n, -1, 2)]
    kind = "Q4_0"
    if not bool((zeros == 8).all()):
        kind = "Q4_1"
        minimum = (-scales.float() * zeros.float()).half().repeat_interleave(repeat, dim=1)
        parts.append(minimum.numpy().view(np.uint8).reshape(n, -1, 2))
    return np.concatenate([*parts, qs], axis=-1).reshape(n, -1), kind


def _quantized_tensor(layer: str, spec: LayerSpec, stored: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    w = spec.weight
    if spec.input is not None:
        raise refuse(TARGET, layer, "static input quantization has no GGUF form")
    if w.bits != 4:
        raise refuse(TARGET, layer, f"{w.bits}-bit weights; Q4_0 / Q4_1 hold 4 bits")
    if w.group_size % BLOCK:
        raise refuse(TARGET, layer, f"group size {w.group_size} is no multiple of the 32-weight GGML block")
    scales = stored["weight_scales"]
    if not torch.equal(scales.half().float(), scales.float()):
        raise refuse(TARGET, layer, f"{w.scale_dtype} scales not representable in float16 (GGML's d)")
    zeros = stored.get("weight_zeros")
    if zeros is None:
        zeros = torch.full((w.rows, w.groups), w.implied_zero, dtype=torch.uint8)
    return stored_codes(w, stored), scales, zeros


def _hparams(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
        "rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])


def _check_llama(path: str, config: dict) -> None:
    if config.get("model_type") not in LLAMA_TYPES:
        raise ConversionError(f"cannot convert to {TARGET}: {path} is a {config.get('model_type')!r} model; "
                              f"this converter writes {', '.join(LLAMA_TYPES)} only")
    scaling = config.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConversionError(f"cannot convert to {TARGET}: rope scaling {scaling} is not written by this converter")


def _tied_layers(path: str, config: dict, manifest) -> set[str]:
    """Layers stored as another layer's table. The one llama.cpp knows: a tied output head, read from
    token_embd when the file has no output.weight; it is written once, as token_embd."""
    tied = {layer for layer, spec in manifest.layers.items()
            if any(layer_tensor(layer, suffix) in manifest.tied for suffix in spec.tensor_shapes())}
    for layer in tied:
        source = manifest.tied.get(layer_tensor(layer, "weight_packed"), "")
        if not (layer == "lm_head" and config.get("tie_word_embeddings") and source.startswith("model.embed_tokens.")):
            raise refuse(TARGET, layer, f"shares its table with {source.rsplit('.', 1)[0] or 'another layer'}; "
                         "llama.cpp shares only the output head with the token embeddings")
    if config.get("tie_word_embeddings") and "lm_head" in manifest.layers and "lm_head" not in tied:
        raise ConversionError(f"cannot convert to {TARGET}: {path} ties the word embeddings in its config "
                              "but stores its own lm_head; llama.cpp would read the head from token_embd")
    return tied


def export_gguf(path: str | os.PathLike, out: str | os.PathLike,
                vocab: str | os.PathLike | None = None) -> GGUFReport:
    """Write the qat file `path` (a Hugging Face Llama) as a GGUF file at `out`; returns a `GGUFReport`.

    `vocab`: a GGUF file to copy the tokenizer from (default: the model's own GGUF source, if any).
    """
    import gguf

    path = os.fspath(path)
    manifest, stored = _read_file(path)
    config = manifest.architecture["hf_config"]
    _check_llama(path, config)
    tied = _tied_layers(path, config, manifest)
    tokenizer = tokenizer_fields(manifest, vocab, config["vocab_size"])
    tied_config = bool(config.get("tie_word_embeddings"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tensors: dict[str, tuple[np.ndarray, str]] = {}
    owned = manifest.layer_tensor_names()
    for layer, spec in manifest.layers.items():
        if layer in tied:
            continue
        if spec.weight is None:
            raise refuse(TARGET, layer, "static input quantization without weight quantization")
        layer_stored = {suffix: stored[layer_tensor(layer, suffix)] for suffix in spec.tensor_shapes()}
        codes, scales, zeros = _quantized_tensor(layer, spec, layer_stored)
        codes, scales, zeros = _permuted(layer, (codes, scales, zeros), heads, kv_heads)
        tensors[_gguf_name(names, layer + ".weight", layer)] = q4_blocks(codes, scales, zeros, spec.weight.group_size)
    persistent = set(build_architecture(manifest.architecture, path).state_dict())  # not rotary buffers
    for name, tensor in stored.items():
        if name in owned or name not in persistent or (name == "lm_head.weight" and tied_config):
            continue
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            tensor = permute_rows(tensor, heads if name.endswith("q_proj.weight") else kv_heads)
        tensors[_gguf_name(names, name, name)] = (tensor.float().numpy(), "F32")
    return _write(out, config, tensors, manifest, tokenizer)


def _permuted(layer: str, arrays: tuple, heads: int, kv_heads: int) -> tuple:
    if layer.endswith("self_attn.q_proj"):
        return tuple(permute_rows(a, heads) for a in arrays)
    if layer.endswith("self_attn.k_proj"):
        return tuple(permute_rows(a, kv_heads) for a in arrays)
    return arrays


def _gguf_name(names, name: str, layer: str) -> str:
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise refuse(TARGET, layer, f"tensor '{name}' has no llama.cpp name")
    return mapped


def _write(out: str | os.PathLike, config: dict, tensors: dict, manifest, tokenizer: tuple) -> GGUFReport:
    import gguf

    partial = os.fspath(out) + ".partial"  # a failed write never leaves a file that looks complete
    writer = gguf.GGUFWriter(partial, "llama")
    _hparams(writer, config)
    fields, origin = tokenizer
    for key, value, kind, sub_kind in fields:
        writer.add_key_value(key, value, kind, sub_type=sub_kind)
    if manifest.golden is not None:
        writer.add_string(KEY_GOLDEN, encode_golden(manifest.golden))
    report = GGUFReport(os.fspath(out), tokenizer=origin)
    for name, (data, kind) in tensors.items():
        raw_dtype = None if kind == "F32" else gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
        report.types[name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    return report
