"""Per-layer sensitivity and a mixed-precision bit assignment under an average-bits budget.

Sensitivity of layer L at b bits: the mean KL(float || model) over the validation set
when only L's weights are quantized, round-to-nearest at b bits with the recipe's
other settings (range initialized from the float weights; activations left in float).
KL is used rather than the accuracy drop because it still moves when accuracy saturates.

The assignment minimizes the sum of the chosen per-layer KLs subject to

    sum_L weights_L * bits_L  <=  budget_bits * sum_L weights_L

exactly (integer bit counts, no rounding), by dynamic programming over the Pareto front
of (bits used, total KL): the optimum of this additive model, never over budget. Bits
count code bits only (scales and zero points are not part of the budget).

Example:
    >>> bits = assign_bits({"a": 100, "b": 100}, {"a": {2: 5.0, 4: 0.1}, "b": {2: 0.2, 4: 0.1}}, 3.0)
    >>> bits
    {'a': 4, 'b': 2}
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import nn

from qat.config import QuantRule
from qat.control import set_fake_quant
from qat.eval import metrics
from qat.eval.outputs import Outputs, collect
from qat.recipe import Recipe
from qat.swap import prepare
from qat.tasks import Task

DEFAULT_BITS = (2, 3, 4, 8)


def assign_bits(weights: dict[str, int], cost: dict[str, dict[int, float]], budget_bits: float) -> dict[str, int]:
    """Bits per layer minimizing the summed cost within `budget_bits` average bits per weight.

    Raises ValueError when even the fewest bits of every layer exceed the budget."""
    total = sum(weights.values())
    limit = budget_bits * total
    fewest = {layer: min(cost[layer]) for layer in weights}
    if sum(weights[layer] * fewest[layer] for layer in weights) > limit:
        minimum = sum(weights[layer] * fewest[layer] for layer in weights) / total
        raise ValueError(f"budget of {budget_bits} bits/weight is below the minimum of {minimum:.4f} "
                         f"(every layer at its fewest bits)")
    layers = sorted(weights)
    states: list[tuple[int, float, dict[str, int]]] = [(0, 0.0, {})]  # (bits used, total cost, assignment)
    for i, layer in enumerate(layers):
        rest = sum(weights[other] * fewest[other] for other in layers[i + 1:])
        grown = [(used + weights[layer] * bits, loss + value, {**assign, layer: bits})
                 for used, loss, assign in states for bits, value in cost[layer].items()
                 if used + weights[layer] * bits + rest <= limit]
        states = _pareto(grown)
    return min(states, key=lambda s: (s[1], s[0]))[2]


def _pareto(states: list[tuple[int, float, dict[str, int]]]) -> list[tuple[int, float, dict[str, int]]]:
    """Keep the states no other state beats in both bits used and cost."""
    front, best = [], math.inf
    for state in sorted(states, key=lambda s: (s[0], s[1])):
        if state[1] < best:
            front.append(state)
            best = state[1]
    return front


def average_bits(weights: dict[str, int], bits: dict[str, int]) -> float:
    """Weight-count-weighted mean of `bits`."""
    return sum(weights[layer] * bits[layer] for layer in weights) / sum(weights.values())


def rules_for(bits: dict[str, int], base_rules: Sequence[QuantRule] = ()) -> list[QuantRule]:
    """The recipe's rules followed by one `bits` rule per layer (exact-name regex)."""
    return [*base_rules, *(QuantRule(name=_exact(layer), bits=b) for layer, b in sorted(bits.items()))]


def _exact(name: str) -> str:
    """A regex matching exactly `name`, written without backslashes (paste-safe in YAML and shells)."""
    return re.sub(r"[^A-Za-z0-9_]", lambda m: f"[{m.group(0)}]", name)


def _rule_text(rule: QuantRule) -> str:
    fields = {k: v for k, v in vars(rule).items() if v is not None}
    parts = [f'{k}: "{v}"' if isinstance(v, str) else f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
             for k, v in fields.items()]
    return "{" + ", ".join(parts) + "}"


def rules_override(rules: Sequence[QuantRule]) -> str:
    """`quant.rules=[...]`: a command-line override (quote it in the shell) or a recipe line."""
    return "quant.rules=[" + ", ".join(_rule_text(rule) for rule in rules) + "]"


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """Weight count of every layer with a weight quantizer."""
    return {name: module.weight.numel() for name, module in model.named_modules()
            if getattr(module, "weight_quantizer", None) is not None}


@torch.no_grad()
def _model_at_bits(recipe: Recipe, float_model: nn.Module, layers: Sequence[str], bits: int) -> nn.Module:
    """A copy of the float model prepared with every layer of `layers` at `bits` (ranges from these
    weights), all fake-quant off."""
    quant = replace(recipe.quant, rules=rules_for({layer: bits for layer in layers}, recipe.quant.rules))
    model, _ = prepare(copy.deepcopy(float_model), quant)
    set_fake_quant(model, weights=False, activations=False)
    return model.eval()


def layer_sensitivity(recipe: Recipe, float_model: nn.Module, batches: list,
                      bits_choices: Sequence[int] = DEFAULT_BITS,
                      layers: Optional[dict[str, int]] = None, task: Optional[Task] = None) -> list[dict[str, Any]]:
    """Per layer: weight count, and KL to float and accuracy at each of `bits_choices` with only
    that layer quantized (weights only), most sensitive (at the fewest bits) first. `layers`
    (name -> weight count; default: those the recipe quantizes) limits the layers; `task` splits
    and scores the batches (`qat.eval.outputs.collect`)."""
    reference: Outputs = collect(float_model, batches, task=task)
    if layers is None:
        layers = quantized_layers(prepare(copy.deepcopy(float_model), recipe.quant)[0])
    rows = {layer: {"layer": layer, "weights": count, "kl": {}, "accuracy": {}} for layer, count in layers.items()}
    for bits in bits_choices:
        model = _model_at_bits(recipe, float_model, list(layers), bits)
        for layer in layers:
            quantizer = model.get_submodule(layer).weight_quantizer
            quantizer.enable(True)
            out = collect(model, batches, task=task)
            quantizer.enable(False)
            rows[layer]["kl"][str(bits)] = metrics.mean_kl(out.logits, reference.logits)
            rows[layer]["accuracy"][str(bits)] = metrics.accuracy(out.logits, out.labels)
    fewest = str(min(bits_choices))
    return sorted(rows.values(), key=lambda r: -r["kl"][fewest])


def suggest(recipe: Recipe, sensitivity: list[dict[str, Any]], budget_bits: float) -> dict[str, Any]:
    """The bit assignment under `budget_bits` and the recipe rules that apply it."""
    weights = {row["layer"]: row["weights"] for row in sensitivity}
    cost = {row["layer"]: {int(b): kl for b, kl in row["kl"].items()} for row in sensitivity}
    bits = assign_bits(weights, cost, budget_bits)
    rules = rules_for(bits, recipe.quant.rules)
    return {"budget_bits": budget_bits, "bits": bits, "average_bits": average_bits(weights, bits),
            "predicted_kl_sum": sum(cost[layer][b] for layer, b in bits.items()),
            "override": rules_override(rules)}
