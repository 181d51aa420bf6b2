"""`qat export FILE --to onnx --kv-cache`: a Llama-layout causal LM as an ONNX graph with a KV cache.

The plain ONNX export (onnx.py) maps ids to logits, so generating with it recomputes the whole
prefix for every new token. This graph takes the cache and returns it extended:

    inputs   input_ids (B, T) int64; past_keys, past_values (layers, B, kv_heads, P, D) float32
             (P = 0 for a prompt: tensors with a zero-length axis)
    outputs  logits (B, T, V); present_keys, present_values (layers, B, kv_heads, P + T, D),
             the next call's past

New tokens take positions P .. P + T - 1 and attend causally to the past and to each other. The
projections are the same MatMulNBits nodes (or exact float layers) as the plain export; norms and
rotary embeddings are the model's own modules, so the graph computes what transformers computes
for a Llama, Mistral (within its window) or Qwen2 model (`llama_decoder.unsupported_reason`).

Example:
    >>> export_onnx_with_cache("smollm2.safetensors", "smollm2-kv.onnx")
    >>> logits, keys, values = session.run(None, {"input_ids": ids, "past_keys": empty, "past_values": empty})
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qat.export import golden
from qat.export.load import load
from qat.export.targets.errors import ConversionError
from qat.export.targets.matmul_nbits import translations
from qat.export.targets.onnx import ACCURACY_LEVELS, METADATA_SOURCE, OnnxReport, convert_layers
from qat.hf.llama_decoder import head_dim, unsupported_reason

INPUT_NAMES = ["input_ids", "past_keys", "past_values"]
OUTPUT_NAMES = ["logits", "present_keys", "present_values"]


class LlamaWithCache(nn.Module):
    """(ids, past keys, past values) -> (logits, present keys, present values) for a Llama-layout model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim(config)

    def forward(self, ids: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        body, (batch, count), past = self.model.model, ids.shape, past_keys.shape[3]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        x = body.embed_tokens(ids).float()  # (B, T, H)
        positions = (torch.arange(count, device=ids.device) + past).unsqueeze(0)  # (1, T)
        cos, sin = body.rotary_emb(x, positions)  # (1, T, D) each
        rows = torch.arange(count, device=ids.device).unsqueeze(1) + past
        mask = torch.arange(past + count, device=ids.device).unsqueeze(0) <= rows  # (T, P + T): causal
        keys_out, values_out = [], []
        for index, layer in enumerate(body.layers):
            attention, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            query = attention.q_proj(h).view(batch, count, heads, dim).transpose(1, 2)  # (B, heads, T, D)
            key = attention.k_proj(h).view(batch, count, kv_heads, dim).transpose(1, 2)
            value = attention.v_proj(h).view(batch, count, kv_heads, dim).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key = torch.cat([past_keys[index], key], dim=2)  # (B, kv_heads, P + T, D)
            value = torch.cat([past_values[index], value], dim=2)
            keys_out.append(key)
            values_out.append(value)
            group = heads // kv_heads
            out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, dim=1),
                                                 value.repeat_interleave(group, dim=1), attn_mask=mask,
                                                 scale=dim ** -0.5)  # (B, heads, T, D)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(batch, count, heads * dim))
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        logits = self.model.lm_head(body.norm(x))
        return logits, torch.stack(keys_out), torch.stack(values_out)


def empty_cache(config: Any, batch: int = 1) -> tuple[Tensor, Tensor]:
    """Zero-length past keys and values for a prompt: (layers, batch, kv_heads, 0, head_dim) each, from the
    model's Hugging Face config (`qat.load(file).config`)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    shape = (config.num_hidden_layers, batch, kv_heads, 0, head_dim(config))
    return torch.zeros(shape), torch.zeros(shape)


def export_onnx_with_cache(path: str | os.PathLike, out: str | os.PathLike, *, accuracy_level: int = 0,
                           dequantize_unsupported: bool = False) -> OnnxReport:
    """Write the Llama-layout causal LM in the qat file `path` as an ONNX graph with KV-cache inputs at `out`."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level={accuracy_level!r}; allowed: {ACCURACY_LEVELS}")
    model = load(path, kernel_backend="reference")
    reason = unsupported_reason(model)
    if reason is not None:
        raise ConversionError(f"cannot convert {path} to onnx with a KV cache: {reason}")
    report = convert_layers(model, "int4", accuracy_level, dequantize_unsupported)
    report.path = os.fspath(out)
    wrapper = LlamaWithCache(model).eval()
    keys, values = empty_cache(model.config, batch=2)
    keys, values = (torch.randn(*t.shape[:3], 3, t.shape[4]) for t in (keys, values))  # trace with P = 3
    ids = torch.zeros(2, 4, dtype=torch.long)  # B = 2, T = 4: sizes 0 and 1 would be fixed by the trace
    batch, tokens, past = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("past")
    dynamic = ({0: batch, 1: tokens}, {1: batch, 3: past}, {1: batch, 3: past})
    program = torch.onnx.export(wrapper, (ids, keys, values), dynamo=True, custom_translation_table=translations(),
                                optimize=True, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                dynamic_shapes=dynamic, verbose=False)
    program.model.metadata_props[METADATA_SOURCE] = golden.file_sha256(path)
    program.model.metadata_props["qat.layers"] = json.dumps({"matmul_nbits": report.matmul_nbits,
                                                             "float": report.dequantized}, sort_keys=True)
    program.model.metadata_props["qat.kv_cache"] = json.dumps({"inputs": INPUT_NAMES, "outputs": OUTPUT_NAMES})
    program.save(os.fspath(out))
    return report
