"""prepare on real Hugging Face modules: every Linear, tied tables with one quantizer, group-size fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat.config import ConfigError, QuantizerConfig, QuantRule, QuantSpec
from qat.control import quantizer_parameters, quantizers
from qat.fake_quant import FakeQuantizer
from qat.hf.load import load_hf_model
from qat.modules import QuantEmbedding, QuantLinear
from qat.recipe import HFSource
from qat.swap import prepare

W4 = QuantizerConfig(bits=4, symmetric=False, group_size=64, quantizer="lsq_plus", init="minmax")


def llama(folder):
    return load_hf_model(HFSource(path=str(folder)))


def test_every_linear_and_the_tied_table_share_one_quantizer(llama_folder):
    model, report = prepare(llama(llama_folder), QuantSpec(weight=W4))
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight_quantizer is model.model.embed_tokens.weight_quantizer
    assert report["lm_head"].reason == "tied to model.embed_tokens: shares its weight and quantizer"
    params = quantizer_parameters(model)
    assert len({id(p) for p in params}) == len(params)  # the shared quantizer is in the optimizer once
    assert len(params) == 2 * len({id(q) for _, q in quantizers(model)})
    assert not [layer for layer in report.layers if layer.action == "unsupported"]  # RMSNorm stays float by design


def test_a_group_size_that_does_not_divide_falls_back_to_a_divisor_the_report_shows(llama_folder):
    model, report = prepare(llama(llama_folder), QuantSpec(weight=W4))
    down = report["model.layers.0.mlp.down_proj"]  # input dimension 96
    assert down.action == "quantized" and down.config.weight.group_size == 32
    assert down.reason == "group_size 32: group_size 64 does not divide input dimension 96"
    assert "(group_size 32: group_size 64 does not divide input dimension 96)" in str(report)
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.scale.shape == (64, 3)


def test_skipping_instead_warns_when_too_many_weights_stay_float(llama_folder):
    with pytest.warns(UserWarning, match=r"of the weights of quantizable layers stay float"):
        _, report = prepare(llama(llama_folder), QuantSpec(weight=W4, group_fallback="skip"))
    assert report["model.layers.1.mlp.down_proj"].action == "skipped"


def test_tied_layers_with_different_settings_are_refused(llama_folder):
    spec = QuantSpec(weight=W4, rules=[QuantRule(name="lm_head", bits=8)])
    with pytest.raises(ConfigError, match=r"layers model\.embed_tokens, lm_head share one weight \(tied\)"):
        prepare(llama(llama_folder), spec)
    spec = QuantSpec(weight=W4, rules=[QuantRule(name="lm_head|model.embed_tokens", skip=True)])
    model, report = prepare(llama(llama_folder), spec)  # skipping both is fine
    assert type(model.lm_head) is nn.Linear and report["lm_head"].action == "skipped"


def test_subclasses_of_linear_are_quantized():
    class MyLinear(nn.Linear):
        pass

    model, report = prepare(nn.Sequential(MyLinear(64, 8)), QuantSpec(weight=W4))
    assert isinstance(model[0], QuantLinear) and report["0"].type == "Linear"


def test_scales_are_created_on_the_weight_device(monkeypatch):
    # No GPU here: the meta device stands in for "not the CPU" (range init reads values, so it is skipped).
    monkeypatch.setattr(FakeQuantizer, "init_from", lambda self, weight: None)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 8))
    spec = QuantSpec(weight=QuantizerConfig(group_size=64, init="minmax"),
                     activation=QuantizerConfig(bits=8, symmetric=False, granularity="tensor",
                                                quantizer="lsq_plus", init="minmax"))
    model, _ = prepare(model, spec)
    assert {p.device.type for p in quantizer_parameters(model)} == {"meta"}


def test_pruning_never_selects_a_tied_table(llama_folder):
    from qat.prune import select_layers

    model, _ = prepare(llama(llama_folder), QuantSpec(weight=W4))
    chosen, skipped = select_layers(model, nm_group=4)
    assert "lm_head" not in chosen and "model.layers.0.mlp.up_proj" in chosen
    assert skipped["lm_head"] == "weight tied to model.embed_tokens (pruning would zero the shared table)"
