"""Tiny Hugging Face models built locally (no download) and saved as model folders, for the qat.hf tests.

    tiny_llama_folder   LlamaForCausalLM, tied embedding / output head, hidden 64, MLP 96 (96 is not a
                        multiple of 64: the group-size fallback applies), 2 layers, vocabulary 64,
                        with the word tokenizer of tests/qat/data
    tiny_bert_folder    BertModel (an encoder), hidden 32, 2 layers, with the same tokenizer
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.qat.data.tokenizers_for_tests import word_tokenizer

VOCAB = 64


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=True, bos_token_id=2, eos_token_id=4, pad_token_id=0)
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(str(folder))
    word_tokenizer(model_max_length=64).save_pretrained(str(folder))
    return folder


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(folder))
    word_tokenizer(model_max_length=64).save_pretrained(str(folder))
    return folder
