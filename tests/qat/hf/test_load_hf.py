"""qat.hf.load: folders, package folders, GGUF conversion cache, and a clear error for each bad source."""

from __future__ import annotations

import pytest
import torch

from qat.config import ConfigError
from qat.hf.load import HFLoadError, hf_architecture, load_hf_model, load_tokenizer, resolve_path
from qat.recipe import HFSource, load_recipe


def test_a_folder_loads_in_float_in_train_mode_without_touching_the_rng(llama_folder):
    state = torch.get_rng_state()
    model = load_hf_model(HFSource(path=str(llama_folder)))
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and next(model.parameters()).dtype == torch.float32
    bf16 = load_hf_model(HFSource(path=str(llama_folder), dtype="bfloat16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert load_tokenizer(HFSource(path=str(llama_folder)))("the value")["input_ids"] == [2, 5, 31, 3]


def test_architecture_records_config_and_source(llama_folder):
    source = HFSource(path=str(llama_folder))
    architecture = hf_architecture(load_hf_model(source), source)
    assert architecture["hf_config"]["model_type"] == "llama"
    assert architecture["hf_config"]["architectures"] == ["LlamaForCausalLM"]
    assert architecture["hf_source"] == {"path": str(llama_folder), "gguf_file": None, "kind": "causal_lm",
                                         "dtype": "float32", "tokenizer": None, "config": {}}


def test_config_settings_replace_the_pretrained_ones_and_unknown_ones_are_refused(llama_folder, tmp_path):
    model = load_hf_model(HFSource(path=str(llama_folder), config={"attention_dropout": 0.25}))
    assert model.config.attention_dropout == 0.25
    assert all(layer.self_attn.attention_dropout == 0.25 for layer in model.model.layers)
    with pytest.raises(HFLoadError, match=r"not_a_setting"):
        load_hf_model(HFSource(path=str(llama_folder), config={"not_a_setting": 1}))
    recipe = load_recipe(None, ["task=causal_lm", f"model.hf.path={llama_folder}",
                                "model.hf.config={attention_dropout: 0.0}"])
    assert recipe.model.hf.config == {"attention_dropout": 0.0}


def test_package_paths_resolve_inside_the_installed_package_without_importing_it():
    assert resolve_path("pkg:qat/hf") == resolve_path("pkg:qat") / "hf"
    assert (resolve_path("pkg:qat") / "swap.py").is_file()
    with pytest.raises(HFLoadError, match=r"no installed package 'not_a_package_qat'"):
        resolve_path("pkg:not_a_package_qat/model")


def test_bad_sources_are_clear_errors(tmp_path, llama_folder):
    with pytest.raises(HFLoadError, match=r"is not a folder"):
        load_hf_model(HFSource(path=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFLoadError, match=r"has no config.json \(not a Hugging Face model folder"):
        load_hf_model(HFSource(path=str(empty)))
    (empty / "config.json").write_text((llama_folder / "config.json").read_text())
    with pytest.raises(HFLoadError, match=r"has a config.json but no weights"):
        load_hf_model(HFSource(path=str(empty)))
    with pytest.raises(HFLoadError, match=r"no GGUF file 'model.gguf' .* \(GGUF files there: none\)"):
        load_hf_model(HFSource(path=str(empty), gguf_file="model.gguf"))
    (empty / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(HFLoadError, match=r"transformers cannot read the GGUF file .*model\.gguf"):
        load_hf_model(HFSource(path=str(empty), gguf_file="model.gguf"))


def test_recipe_model_section_takes_a_target_or_hf_not_both(llama_folder):
    recipe = load_recipe(None, [f"model.hf.path={llama_folder}", "task=causal_lm"])
    assert recipe.model.hf.path == str(llama_folder) and recipe.model._target_ is None
    assert load_recipe(None).model.target == "qat.models.DigitsCNN"
    with pytest.raises(ConfigError, match=r"set either model._target_ .* or model.hf"):
        load_recipe(None, [f"model.hf.path={llama_folder}", "model._target_=qat.models.TinyLM"])
    with pytest.raises(ConfigError, match=r"model.hf.kind='decoder' is not valid"):
        load_recipe(None, [f"model.hf.path={llama_folder}", "model.hf.kind=decoder"])
