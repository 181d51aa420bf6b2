"""Small exported models shared by the converter tests (digits CNN, TinyLM, BERT, Llama), built without downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_prepared
from torch import nn

import qat
from qat import QuantizerConfig, QuantRule, QuantSpec
from qat.models import DigitsCNN, TinyLM


def weight_config(**options: object) -> QuantizerConfig:
    return QuantizerConfig(**{"bits": 4, "granularity": "group", "group_size": 32, "init": "minmax", **options})


def digits_validation() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits validation split (359 images, labels) of the default recipe."""
    from qat.data.digits import DigitsDataModule

    data = DigitsDataModule()
    data.setup()
    return data.val_set.tensors


def export_digits(path: Path, images: torch.Tensor, weight_bits: int = 4) -> nn.Module:
    """The digits recipes' DigitsCNN spec (LSQ weights g128 at `weight_bits`: 2 is the default recipe's W2A4,
    LSQ+ 4-bit activations), calibrated."""
    activation = QuantizerConfig(bits=4, symmetric=False, granularity="tensor", quantizer="lsq_plus", init="minmax",
                                 scale_dtype="float32")
    spec = QuantSpec(weight=weight_config(group_size=128, bits=weight_bits), activation=activation,
                     rules=[QuantRule(type="Conv2d", granularity="channel")])
    torch.manual_seed(0)
    model = make_prepared(DigitsCNN(), spec, seed=0, calibrate_with=images[:64])
    qat.export_model(model, path, architecture={"_target_": "qat.models.DigitsCNN"}, golden_inputs=(images[:4],))
    return model


def export_tiny_lm(path: Path, **weight_options: object) -> nn.Module:
    torch.manual_seed(0)
    model = make_prepared(TinyLM(), QuantSpec(weight=weight_config(**weight_options)), seed=1)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    qat.export_model(model, path, architecture={"_target_": "qat.models.TinyLM"}, golden_inputs=(tokens,))
    return model


def export_bert(path: Path) -> nn.Module:
    """A 2-layer BERT classifier from a local BertConfig (random weights; no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    spec = QuantSpec(weight=weight_config(), rules=[QuantRule(name="classifier", skip=True)])
    model = make_prepared(BertForSequenceClassification(config).eval(), spec, seed=0)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    qat.export_model(model, path, architecture={"hf_config": config.to_dict()}, golden_inputs=(ids,))
    return model


LLAMA_HEADS, LLAMA_KV_HEADS = 4, 2


def export_llama(path: Path, lm_head_per_channel: bool = False, tie: bool = False,
                 **weight_options: object) -> nn.Module:
    """A 2-layer Llama (grouped-query attention) from a local LlamaConfig (random weights; no download);
    `tie`: the embedding table is also the output head (as in SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=LLAMA_HEADS, num_key_value_heads=LLAMA_KV_HEADS,
                         max_position_embeddings=64, tie_word_embeddings=tie, use_cache=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    rules = [QuantRule(name="lm_head", granularity="channel")] if lm_head_per_channel else []
    spec = QuantSpec(weight=weight_config(**weight_options), rules=rules)
    model = make_prepared(LlamaForCausalLM(config).eval(), spec, seed=0)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    qat.export_model(model, path, architecture={"hf_config": config.to_dict()}, golden_inputs=(ids,))
    return model


def relative_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())
