"""qat file -> GGUF (llama.cpp), checked against the gguf package's own reader and dequantizer.

These tests pin the layout: block bytes, the Q/K row permutation, tied tables, the tokenizer,
hyper-parameters and refusals; `test_llama_cpp.py` runs llama.cpp itself on the result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_models import LLAMA_HEADS as HEADS
from deploy_models import LLAMA_KV_HEADS as KV_HEADS
from deploy_models import export_llama, export_tiny_lm

import qat
from qat.export.targets import ConversionError
from qat.export.targets.gguf import export_gguf, permute_rows

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

def read_back(path: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """{gguf name: (tensor dequantized by the gguf package, GGML type name)}."""
    reader = gguf.GGUFReader(path)
    result = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        result[tensor.name] = (torch.from_numpy(values.copy()).float(), tensor.tensor_type.name)
    return result


def expected_weights(path: Path) -> dict[str, torch.nn.Module]:
    loaded = qat.load(path, kernel_backend="reference")
    layers = {"token_embd.weight": loaded.model.embed_tokens, "output.weight": loaded.lm_head}
    for i, block in enumerate(loaded.model.layers):
        for short, module in [("attn_q", block.self_attn.q_proj), ("attn_k", block.self_attn.k_proj),
                              ("attn_v", block.self_attn.v_proj), ("attn_output", block.self_attn.o_proj),
                              ("ffn_gate", block.mlp.gate_proj), ("ffn_up", block.mlp.up_proj),
                              ("ffn_down", block.mlp.down_proj)]:
            layers[f"blk.{i}.{short}.weight"] = module
    return layers


def test_permute_rows_by_hand() -> None:
    rows = torch.arange(8).reshape(8, 1)  # two heads of 4 rows: (0 1 | 2 3), (4 5 | 6 7)
    assert permute_rows(rows, 2).reshape(-1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("group_size", [32, 64])
def test_symmetric_groups_are_q4_0_blocks_equal_to_our_weights(tmp_path: Path, group_size: int) -> None:
    export_llama(tmp_path / "llama.safetensors", group_size=group_size)
    report = export_gguf(tmp_path / "llama.safetensors", tmp_path / "llama.gguf")
    tensors = read_back(tmp_path / "llama.gguf")
    assert set(report.types) == set(tensors)
    for name, module in expected_weights(tmp_path / "llama.safetensors").items():
        weight, kind = tensors[name]
        expected = module.dequantized_weight()
        if ".attn_q." in name or ".attn_k." in name:
            expected = permute_rows(expected, HEADS if ".attn_q." in name else KV_HEADS)
        assert kind == "Q4_0" and torch.equal(weight, expected), name
    assert tensors["blk.1.attn_norm.weight"][1] == "F32"
    fields = gguf.GGUFReader(tmp_path / "llama.gguf").fields
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == KV_HEADS
    assert "qat.golden" in fields


def test_asymmetric_groups_are_q4_1_with_the_minimum_rounded_to_float16(tmp_path: Path) -> None:
    export_llama(tmp_path / "llama.safetensors", group_size=64, symmetric=False, quantizer="lsq_plus")
    export_gguf(tmp_path / "llama.safetensors", tmp_path / "llama.gguf")
    tensors = read_back(tmp_path / "llama.gguf")
    module = expected_weights(tmp_path / "llama.safetensors")["blk.0.ffn_down.weight"]
    weight, kind = tensors["blk.0.ffn_down.weight"]
    codes = qat.kernels.reference.unpack_int4(module.weight_packed).float()  # (64, 128)
    scale = module.weight_scales.float().repeat_interleave(64, dim=1)
    zero = module.weight_zeros.float().repeat_interleave(64, dim=1)
    minimum = (-scale * zero).half().float()
    assert kind == "Q4_1" and torch.equal(weight, scale * codes + minimum)  # the format's formula, bit for bit
    ours = module.dequantized_weight()
    bound = 2.0**-11 * (scale * zero).abs() + 2.0**-23 * ours.abs() + 1e-12  # fp16 rounding of m, then fp32
    assert ((weight - ours).abs() <= bound).all()


def test_what_gguf_cannot_hold_is_refused(tmp_path: Path) -> None:
    export_llama(tmp_path / "g16.safetensors", group_size=16)
    with pytest.raises(ConversionError, match=r"layer '[a-z_.0-9]+': group size 16 is no multiple of the 32-weight"):
        export_gguf(tmp_path / "g16.safetensors", tmp_path / "out.gguf")
    export_tiny_lm(tmp_path / "tiny.safetensors")
    with pytest.raises(ConversionError, match="only Hugging Face configs"):
        export_gguf(tmp_path / "tiny.safetensors", tmp_path / "out.gguf")


def test_cli_converts_and_reports_refusals(tmp_path: Path, capsys) -> None:
    from qat.cli import main

    export_llama(tmp_path / "llama.safetensors")
    assert main(["export", str(tmp_path / "llama.safetensors"), "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    assert "16 Q4_0" in capsys.readouterr().out and (tmp_path / "m.gguf").is_file()
    export_tiny_lm(tmp_path / "tiny.safetensors")
    assert main(["export", str(tmp_path / "tiny.safetensors"), "--to", "compressed-tensors", "-o",
                 str(tmp_path / "folder")]) == 1
    assert "qat export: error: cannot convert to compressed-tensors" in capsys.readouterr().err


def test_tied_embeddings_are_written_once_as_token_embd(tmp_path: Path) -> None:
    export_llama(tmp_path / "tied.safetensors", tie=True, group_size=32)
    report = export_gguf(tmp_path / "tied.safetensors", tmp_path / "tied.gguf")
    tensors = read_back(tmp_path / "tied.gguf")
    loaded = qat.load(tmp_path / "tied.safetensors", kernel_backend="reference")
    assert loaded.lm_head.weight_packed is loaded.model.embed_tokens.weight_packed  # one table in the model too
    assert "output.weight" not in tensors  # llama.cpp computes the logits from token_embd
    weight, kind = tensors["token_embd.weight"]
    assert kind == "Q4_0" and torch.equal(weight, loaded.model.embed_tokens.dequantized_weight())
    assert report.tokenizer.startswith("none")


def write_vocab(path: Path, tokens: int) -> None:
    """A GGUF file holding only a byte-level BPE tokenizer's keys, `tokens` tokens long."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    writer.add_token_merges(["t 1", "t 2"])
    writer.add_bos_token_id(1)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()


def test_the_tokenizer_is_copied_from_a_vocabulary_file_or_left_out(tmp_path: Path) -> None:
    export_llama(tmp_path / "llama.safetensors")
    export_gguf(tmp_path / "llama.safetensors", tmp_path / "bare.gguf")
    assert gguf.GGUFReader(tmp_path / "bare.gguf").fields["tokenizer.ggml.model"].contents() == "none"
    write_vocab(tmp_path / "vocab.gguf", 128)
    report = export_gguf(tmp_path / "llama.safetensors", tmp_path / "with.gguf", vocab=tmp_path / "vocab.gguf")
    fields = gguf.GGUFReader(tmp_path / "with.gguf").fields
    assert report.tokenizer == str(tmp_path / "vocab.gguf")
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.tokens"].contents() == [f"t{i}" for i in range(128)]
    assert fields["tokenizer.ggml.merges"].contents() == ["t 1", "t 2"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert len(gguf.GGUFReader(tmp_path / "with.gguf").tensors) == len(gguf.GGUFReader(tmp_path / "bare.gguf").tensors)


def test_a_vocabulary_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    export_llama(tmp_path / "llama.safetensors")
    write_vocab(tmp_path / "small.gguf", 100)
    with pytest.raises(ConversionError, match="has 100 tokens, the model's vocabulary 128"):
        export_gguf(tmp_path / "llama.safetensors", tmp_path / "out.gguf", vocab=tmp_path / "small.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConversionError, match="cannot read the vocabulary file"):
        export_gguf(tmp_path / "llama.safetensors", tmp_path / "out.gguf", vocab=tmp_path / "junk.gguf")
    with pytest.raises(ConversionError, match="does not exist"):
        export_gguf(tmp_path / "llama.safetensors", tmp_path / "out.gguf", vocab=tmp_path / "missing.gguf")
    assert not (tmp_path / "out.gguf").exists()
