"""The bit assignment: exact budget, fragile layers get the bits, rules that load and apply."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from qat.eval.sensitivity import assign_bits, average_bits, layer_sensitivity, rules_override, suggest
from qat.recipe import load_recipe
from qat.run.build import build_model
from tests.qat.eval.toy_models import FRAGILE_RECIPE


def _brute_force(weights, cost, budget):
    layers = sorted(weights)
    best = None
    for choice in itertools.product(*(sorted(cost[layer]) for layer in layers)):
        bits = dict(zip(layers, choice, strict=True))
        if sum(weights[layer] * bits[layer] for layer in layers) > budget * sum(weights.values()):
            continue
        loss = sum(cost[layer][bits[layer]] for layer in layers)
        if best is None or loss < best[0]:
            best = (loss, bits)
    return best


def test_a_fragile_layer_gets_the_bits_and_the_budget_holds_exactly():
    weights = {"big": 1000, "fragile": 100, "small": 100}
    cost = {"big": {2: 0.01, 4: 0.001, 8: 0.0}, "fragile": {2: 5.0, 4: 0.5, 8: 0.0},
            "small": {2: 0.02, 4: 0.002, 8: 0.0}}
    bits = assign_bits(weights, cost, budget_bits=2.5)
    # 2.5 * 1200 = 3000 bits: big at 2 (2000) leaves 1000 for the two small layers: 8 + 2 = 1000, exactly
    assert bits == {"big": 2, "fragile": 8, "small": 2}
    assert sum(weights[k] * bits[k] for k in weights) == 3000
    assert average_bits(weights, bits) == 2.5


def test_a_budget_below_the_fewest_bits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"below the minimum of 2\.0000"):
        assign_bits({"a": 10}, {"a": {2: 1.0, 4: 0.0}}, budget_bits=1.5)


@pytest.mark.parametrize("seed", range(20))
def test_the_assignment_is_the_brute_force_optimum_and_never_over_budget(seed):
    rng = random.Random(seed)
    layers = [f"l{i}" for i in range(rng.randint(1, 5))]
    weights = {layer: rng.choice([16, 64, 100, 288, 1280]) for layer in layers}
    cost = {layer: {b: rng.random() / b for b in (2, 3, 4, 8)} for layer in layers}
    budget = rng.choice([2.0, 2.5, 3.0, 3.3, 4.0, 6.0])
    bits = assign_bits(weights, cost, budget)
    assert sum(weights[k] * bits[k] for k in weights) <= budget * sum(weights.values())
    best_loss, _ = _brute_force(weights, cost, budget)
    assert sum(cost[k][bits[k]] for k in bits) == pytest.approx(best_loss, rel=1e-12)


def test_suggested_rules_load_as_an_override_and_set_each_layers_bits():
    recipe = load_recipe(FRAGILE_RECIPE)
    sensitivity = [{"layer": "fc1", "weights": 1024, "kl": {"2": 0.1, "4": 0.01, "8": 0.0}},
                   {"layer": "fc2", "weights": 1024, "kl": {"2": 9.0, "4": 1.0, "8": 0.0}}]
    suggestion = suggest(recipe, sensitivity, budget_bits=5.0)
    assert suggestion["bits"] == {"fc1": 2, "fc2": 8}
    assert suggestion["override"] == ('quant.rules=[{type: "Linear", granularity: "channel"}, '
                                      '{name: "fc1", bits: 2}, {name: "fc2", bits: 8}]')
    applied = load_recipe(FRAGILE_RECIPE, [suggestion["override"]])
    model, _ = build_model(applied)
    assert model.fc1.weight_quantizer.config.bits == 2
    assert model.fc2.weight_quantizer.config.bits == 8
    assert rules_override(applied.quant.rules) == suggestion["override"]


def test_layer_sensitivity_finds_the_fragile_layer_of_a_toy_and_the_suggestion_protects_it():
    recipe = load_recipe(FRAGILE_RECIPE)
    float_model = build_model(recipe)[0]  # a fresh model: its weights are the toy's own init
    from qat.swap import unprepare

    float_model = unprepare(float_model).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=generator)
    labels = float_model(x).argmax(-1)
    batches = [(x[:128], labels[:128]), (x[128:], labels[128:])]
    rows = layer_sensitivity(recipe, float_model, batches, bits_choices=(2, 8))
    assert rows[0]["layer"] == "fc2"  # one huge outlier per row: 2-bit ranges crush the other weights
    assert rows[0]["kl"]["2"] > 5 * rows[1]["kl"]["2"]  # measured 0.29 vs 0.035
    suggestion = suggest(recipe, rows, budget_bits=5.0)  # room for exactly one of the two layers at 8 bits
    assert suggestion["bits"] == {"fc1": 2, "fc2": 8}
    assert suggestion["average_bits"] == 5.0
