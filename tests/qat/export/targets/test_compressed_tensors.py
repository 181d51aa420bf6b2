"""qat file -> compressed-tensors folder, checked by loading it with transformers (+ compressed-tensors) on CPU.

Exactness: the folder's float32 scales make compressed-tensors' dequantization compute our
formula in float32, and a decompressed Linear then runs the same F.linear as qat.load's
reference kernel, so logits are compared for equality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_models import export_llama, export_tiny_lm, weight_config

import qat
from qat import QuantRule, QuantSpec
from qat.export.targets import ConversionError
from qat.export.targets.compressed_tensors import export_compressed_tensors, pack_words

transformers = pytest.importorskip("transformers")
pack_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("columns", [64, 12, 5])
def test_pack_words_matches_the_packages_own_packer(columns: int) -> None:
    codes = torch.randint(0, 16, (9, columns), generator=torch.Generator().manual_seed(columns), dtype=torch.uint8)
    expected = pack_helpers.pack_to_int32((codes.to(torch.int8) - 8), 4)  # their codes are q = u - 8
    assert torch.equal(pack_words(codes), expected)
    zeros_expected = pack_helpers.pack_to_int32((codes.to(torch.int8) - 8), 4, packed_dim=0)
    assert torch.equal(pack_words(codes.t().contiguous()).t(), zeros_expected)


def load_folder(folder: Path, run_compressed: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(run_compressed=run_compressed)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False])
def test_transformers_logits_equal_qat_load(tmp_path: Path, symmetric: bool) -> None:
    options = {} if symmetric else {"symmetric": False, "quantizer": "lsq_plus"}
    export_llama(tmp_path / "llama.safetensors", lm_head_per_channel=True, **options)
    report = export_compressed_tensors(tmp_path / "llama.safetensors", tmp_path / "folder")
    assert len(report.quantized) == 15 and report.scheme["group_size"] == 32  # lm_head's one group repeats
    assert report.scheme["symmetric"] is symmetric and report.dense == ["model.embed_tokens"]
    config = transformers.AutoConfig.from_pretrained(tmp_path / "folder").quantization_config
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    loaded = qat.load(tmp_path / "llama.safetensors", kernel_backend="reference")
    hf = load_folder(tmp_path / "folder", run_compressed=False)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, loaded(ids).logits)
    q_proj = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_proj, loaded.model.layers[0].self_attn.q_proj.dequantized_weight())
    if symmetric:  # no zero points: transformers' compressed (on-the-fly) path loads it too
        with torch.no_grad():
            assert torch.equal(load_folder(tmp_path / "folder", run_compressed=True)(ids).logits, loaded(ids).logits)


def test_non_hugging_face_architectures_and_unsupported_layers_are_refused(tmp_path: Path) -> None:
    export_tiny_lm(tmp_path / "tiny.safetensors")
    with pytest.raises(ConversionError, match="only Hugging Face configs"):
        export_compressed_tensors(tmp_path / "tiny.safetensors", tmp_path / "out")
    from conftest import make_prepared
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    config.architectures = ["BertModel"]
    spec = QuantSpec(weight=weight_config(), rules=[QuantRule(name=r"pooler\.dense", bits=3)])
    model = make_prepared(BertModel(config).eval(), spec, seed=0)
    qat.export_model(model, tmp_path / "bert.safetensors", architecture={"hf_config": config.to_dict()})
    with pytest.raises(ConversionError, match=r"layer 'pooler.dense': 3-bit weights"):
        export_compressed_tensors(tmp_path / "bert.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_tied_embedding_and_head_load_untied_with_equal_logits(tmp_path: Path) -> None:
    """SmolLM2's layout: one quantized table for the embedding and the head, stored once in the qat file."""
    export_llama(tmp_path / "tied.safetensors", tie=True, group_size=32, symmetric=False, quantizer="lsq_plus")
    report = export_compressed_tensors(tmp_path / "tied.safetensors", tmp_path / "folder")
    assert "lm_head" in report.quantized and report.dense == ["model.embed_tokens"]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "folder").tie_word_embeddings is False
    loaded = qat.load(tmp_path / "tied.safetensors", kernel_backend="reference")
    hf = load_folder(tmp_path / "folder", run_compressed=False)
    assert torch.equal(hf.model.embed_tokens.weight, loaded.model.embed_tokens.dequantized_weight())
    assert torch.equal(hf.lm_head.weight, loaded.lm_head.dequantized_weight())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, loaded(ids).logits)
