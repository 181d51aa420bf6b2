"""Quantization settings: validation messages, rule resolution, omegaconf structured configs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from qat.config import (
    ConfigError,
    QuantizerConfig,
    QuantRule,
    QuantSpec,
    default_activation_config,
    default_weight_config,
)

# (field values, the field named, a piece of the allowed values) for QuantizerConfig
INVALID_QUANTIZER = [
    ({"bits": 1}, "bits=1", "integers 2..8"),
    ({"bits": 9}, "bits=9", "integers 2..8"),
    ({"bits": 4.0}, "bits=4.0", "integers 2..8"),
    ({"bits": True}, "bits=True", "integers 2..8"),
    ({"bits": "4"}, "bits='4'", "integers 2..8"),
    ({"granularity": "row"}, "granularity='row'", "'tensor', 'channel', 'group'"),
    ({"quantizer": "pact"}, "quantizer='pact'", "'lsq', 'lsq_plus', 'observer'"),
    ({"init": "max"}, "init='max'", "'minmax', 'percentile', 'mse'"),
    ({"group_size": 100}, "group_size=100", "powers of two 16..256"),
    ({"group_size": 8}, "group_size=8", "powers of two 16..256"),
    ({"group_size": 512}, "group_size=512", "powers of two 16..256"),
    ({"group_size": 0}, "group_size=0", "powers of two 16..256"),
    ({"percentile": 50.0}, "percentile=50.0", r"\(50, 100\]"),
    ({"percentile": 100.5}, "percentile=100.5", r"\(50, 100\]"),
    ({"ema_decay": 1.0}, "ema_decay=1.0", r"\[0, 1\)"),
    ({"ema_decay": -0.1}, "ema_decay=-0.1", r"\[0, 1\)"),
    ({"ema_decay": None}, "ema_decay=None", r"\[0, 1\)"),
    ({"percentile": "high"}, "percentile='high'", r"\(50, 100\]"),
    ({"percentile": float("nan")}, "percentile=nan", r"\(50, 100\]"),
    ({"symmetric": "no"}, "symmetric='no'", "true or false"),
    ({"signed": 1}, "signed=1", "true, false or null"),
    ({"scale_dtype": "int8"}, "scale_dtype='int8'", "'float16', 'bfloat16', 'float32'"),
    ({"quantizer": "lsq_plus"}, "quantizer='lsq_plus'", "symmetric=False"),
]


@pytest.mark.parametrize(("kwargs", "field_text", "allowed"), INVALID_QUANTIZER)
def test_invalid_quantizer_values_name_field_and_allowed_values(kwargs, field_text, allowed):
    with pytest.raises(ConfigError, match=rf"QuantizerConfig\.{field_text}.*{allowed}") as info:
        QuantizerConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_group_size_is_not_checked_without_groups():
    assert QuantizerConfig(granularity="channel", group_size=0).granularity == "channel"


INVALID_RULES = [
    ({}, "needs `name`"),
    ({"name": "("}, r"name='\(' is not a valid regex"),
    ({"type": "Conv1d"}, r"type='Conv1d'.*'Linear', 'Conv2d', 'Embedding'"),
    ({"name": "x", "bits": 10}, "bits=10.*integers 2..8"),
    ({"name": "x", "activation_bits": 1}, "activation_bits=1.*integers 2..8"),
    ({"name": "x", "granularity": "block"}, "granularity='block'.*'tensor', 'channel', 'group'"),
    ({"name": "x", "group_size": 96}, "group_size=96.*powers of two"),
    ({"name": 3}, "name=3.*a regular expression string"),
    ({"name": "x", "skip": "yes"}, "skip='yes'.*true, false or null"),
    ({"name": "x", "quantize_activations": 1}, "quantize_activations=1.*true, false or null"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID_RULES)
def test_invalid_rules_raise(kwargs, message):
    with pytest.raises(ConfigError, match=rf"QuantRule.*{message}"):
        QuantRule(**kwargs)


@pytest.mark.parametrize(
    ("bits", "symmetric", "signed", "expected"),
    [
        (4, True, None, (-8, 7)),
        (4, False, None, (0, 15)),
        (8, True, False, (0, 255)),
        (8, False, True, (-128, 127)),
        (2, True, None, (-2, 1)),
    ],
)
def test_code_range_properties(bits, symmetric, signed, expected):
    cfg = QuantizerConfig(bits=bits, symmetric=symmetric, signed=signed, quantizer="observer")
    assert (cfg.qmin, cfg.qmax) == expected
    assert cfg.is_signed is (expected[0] < 0)


def test_defaults():
    weight, act = default_weight_config(), default_activation_config(8)
    assert (weight.bits, weight.granularity, weight.group_size, weight.quantizer, weight.init) == (
        4,
        "group",
        128,
        "lsq",
        "mse",
    )
    assert weight.torch_scale_dtype is torch.float16
    assert (act.bits, act.symmetric, act.quantizer, act.granularity) == (8, False, "lsq_plus", "tensor")


def test_rule_matching_uses_full_regex_and_type():
    rule = QuantRule(name=r"layers\.\d+\.fc", type="Linear")
    assert rule.matches("layers.3.fc", "Linear")
    assert not rule.matches("layers.3.fc2", "Linear")  # fullmatch, not search
    assert not rule.matches("layers.3.fc", "Conv2d")
    assert QuantRule(type="Conv2d").matches("anything", "Conv2d")


def test_resolve_later_rule_wins_per_field():
    spec = QuantSpec(
        rules=[
            QuantRule(type="Linear", bits=8, group_size=64),
            QuantRule(name="head", bits=2),
            QuantRule(name="head", granularity="channel"),
        ]
    )
    head, matched = spec.resolve("head", "Linear")
    assert (head.weight.bits, head.weight.group_size, head.weight.granularity) == (2, 64, "channel")
    assert matched == ["rule(type=Linear)", "rule(name='head')", "rule(name='head')"]
    body, _ = spec.resolve("body", "Linear")
    assert (body.weight.bits, body.weight.group_size) == (8, 64)
    assert spec.resolve("emb", "Embedding")[0].weight == default_weight_config()


def test_resolve_skip_and_unskip():
    spec = QuantSpec(rules=[QuantRule(name=r"blocks\..*", skip=True), QuantRule(name=r"blocks\.0", skip=False)])
    assert spec.resolve("blocks.1", "Linear")[0] is None
    assert spec.resolve("blocks.0", "Linear")[0] is not None


def test_resolve_activation_rules():
    spec = QuantSpec(
        activation=default_activation_config(8),
        rules=[
            QuantRule(name="a", activation_bits=4),
            QuantRule(name="b", quantize_activations=False),
        ],
    )
    assert spec.resolve("a", "Linear")[0].activation.bits == 4
    assert spec.resolve("b", "Linear")[0].activation is None
    plain = QuantSpec(weight=None, rules=[QuantRule(name="c", quantize_activations=True)])
    assert plain.resolve("c", "Linear")[0].activation == default_activation_config()
    assert plain.resolve("d", "Linear")[0] is None  # nothing to quantize


def test_rule_override_that_makes_an_invalid_setting_raises():
    spec = QuantSpec(
        weight=QuantizerConfig(granularity="channel", group_size=0), rules=[QuantRule(name="x", granularity="group")]
    )
    with pytest.raises(ConfigError, match="group_size=0"):
        spec.resolve("x", "Linear")


# ---- omegaconf structured configs ---------------------------------------------------------


def test_structured_config_merge_and_to_object():
    base = OmegaConf.structured(QuantSpec)
    yaml_text = """
    weight: {bits: 3, group_size: 64}
    activation: {bits: 8, symmetric: false, quantizer: lsq_plus, granularity: tensor}
    rules:
      - {name: lm_head, skip: true}
      - {type: Conv2d, granularity: channel}
    strict: true
    """
    merged = OmegaConf.merge(base, OmegaConf.create(yaml_text), OmegaConf.from_dotlist(["weight.init=percentile"]))
    spec = OmegaConf.to_object(merged)
    assert isinstance(spec, QuantSpec) and isinstance(spec.weight, QuantizerConfig)
    assert (spec.weight.bits, spec.weight.group_size, spec.weight.init) == (3, 64, "percentile")
    assert spec.activation.quantizer == "lsq_plus" and spec.strict is True
    assert [type(r) for r in spec.rules] == [QuantRule, QuantRule] and spec.rules[0].skip is True
    assert OmegaConf.to_object(OmegaConf.structured(QuantSpec())) == QuantSpec()


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ({"weight": {"bits": "four"}}, ValidationError, "bits"),
        ({"strict": "sometimes"}, ValidationError, "strict"),
        ({"weight": {"bitz": 4}}, ConfigKeyError, "bitz"),
        ({"shape": 4}, ConfigKeyError, "shape"),
        ({"rules": [{"nme": "x"}]}, ConfigKeyError, "nme"),
    ],
)
def test_structured_config_refuses_wrong_types_and_unknown_keys(override, error, message):
    with pytest.raises(error, match=message):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantSpec), OmegaConf.create(override)))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"weight": {"bits": 9}}, "QuantizerConfig.bits=9"),
        ({"weight": {"granularity": "row"}}, "QuantizerConfig.granularity='row'"),
        ({"rules": [{"skip": True}]}, "QuantRule needs `name`"),
    ],
)
def test_structured_config_runs_validation_on_to_object(override, message):
    with pytest.raises(ConfigError, match=message):
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantSpec), OmegaConf.create(override)))
