"""prepare / unprepare: the swap, the report, rules, strictness and the round trip to float."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat.config import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.functional import NonFiniteError
from qat.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from qat.swap import GroupSizeError, prepare, unprepare


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Net(nn.Module):
    """Every kind of layer prepare meets: supported, non-dividing, unsupported, containers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, kernel_size=4, padding=1)  # 8 * 4 * 4 = 128 inputs
        self.embed = nn.Embedding(20, 256)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(256, 576), nn.PReLU(), nn.Linear(576, 256)) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 10)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        features = self.conv(image).mean(dim=(2, 3))  # (B, 16)
        h = self.embed(ids) + features.repeat(1, 16)[:, None, :]  # (B, T, 256)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))  # (B, T, 10)


W4 = QuantizerConfig(init="minmax")  # the default setting with a quick range init


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 8, 6, 6), torch.randint(0, 20, (2, 5))


def test_report_lists_quantized_skipped_and_unsupported_layers():
    with pytest.warns(UserWarning, match=r"stay float because their group size does not divide"):
        model, report = prepare(Net(), QuantSpec(group_fallback="skip"))
    assert [layer.name for layer in report.quantized] == ["conv", "embed", "blocks.0.0", "blocks.1.0", "head"]
    odd = report["blocks.0.2"]
    assert odd.action == "skipped" and odd.reason == "group_size 128 does not divide input dimension 576"
    prelu = report["blocks.1.1"]
    assert (prelu.action, prelu.type, prelu.reason) == ("unsupported", "PReLU", "no quantized version")
    assert {layer.name for layer in report.skipped} == {"blocks.0.1", "blocks.0.2", "blocks.1.1", "blocks.1.2"}
    assert "norm" not in {layer.name for layer in report.layers}  # norm layers stay float by design
    assert report["head"].config.weight.group_size == 128 and report["head"].config.activation is None
    text = str(report)
    assert text.startswith("prepare: 5 layer(s) quantized, 4 not")
    assert "lsq sym int4/g128" in text and "does not divide input dimension 576" in text
    assert isinstance(model.conv, QuantConv2d) and isinstance(model.embed, QuantEmbedding)
    assert isinstance(model.head, QuantLinear) and type(model.blocks[0][2]) is nn.Linear
    with pytest.raises(KeyError):
        report["missing"]


def test_strict_mode_raises_and_leaves_the_model_untouched():
    model = Net()
    message = r"layer 'blocks\.0\.2': group_size 128 does not divide input dimension 576"
    with pytest.raises(GroupSizeError, match=message):
        prepare(model, QuantSpec(weight=W4, strict=True))
    assert not any(isinstance(m, QuantModule) for m in model.modules())


def test_strict_mode_passes_when_a_rule_fixes_the_group_size():
    spec = QuantSpec(weight=W4, strict=True, rules=[QuantRule(name=r"blocks\.\d+\.2", group_size=64)])  # 576 = 9 * 64
    model, report = prepare(Net(), spec)
    assert report["blocks.1.2"].action == "quantized"
    assert model.blocks[1][2].weight_quantizer.scale.shape == (256, 9)


def test_later_rule_wins_per_field_and_report_names_rules():
    spec = QuantSpec(
        weight=W4,
        rules=[
            QuantRule(type="Linear", bits=8, group_size=64),
            QuantRule(name="head", bits=3),
            QuantRule(name=r"blocks\.0\..*", granularity="channel"),
        ],
    )
    model, report = prepare(Net(), spec)
    head = model.head.weight_quantizer.config
    assert (head.bits, head.group_size, head.granularity) == (3, 64, "group")
    first = model.blocks[0][2].weight_quantizer.config
    assert (first.bits, first.granularity) == (8, "channel")
    assert model.blocks[0][2].weight_quantizer.scale.shape == (256,)
    assert model.blocks[1][2].weight_quantizer.config.group_size == 64
    assert model.conv.weight_quantizer.config.bits == 4  # type rule for Linear only
    assert report["head"].rules == ["rule(type=Linear)", "rule(name='head')"]


def test_skip_by_name_regex_and_by_type():
    spec = QuantSpec(
        weight=W4,
        rules=[
            QuantRule(name=r"blocks\.\d+\.0", skip=True),
            QuantRule(type="Embedding", skip=True),
            QuantRule(type="Conv2d", skip=True),
            QuantRule(name="conv", skip=False),
        ],
    )
    model, report = prepare(Net(), spec)
    assert report["blocks.1.0"].reason == r"skipped by rule(name='blocks\\.\\d+\\.0')"
    assert report["embed"].reason == "skipped by rule(type=Embedding)"
    assert type(model.embed) is nn.Embedding and type(model.blocks[0][0]) is nn.Linear
    assert isinstance(model.conv, QuantConv2d)  # the later rule un-skips it


def test_activation_quantization_from_spec_and_rules():
    rules = [QuantRule(name="head", activation_bits=6)]
    spec = QuantSpec(weight=W4, activation=default_activation_config(8), rules=rules)
    model, report = prepare(Net(), spec)
    assert model.head.input_quantizer.config.bits == 6 and model.blocks[0][0].input_quantizer.config.bits == 8
    assert model.embed.input_quantizer is None and report["embed"].config.activation is None  # ids: no
    assert model.conv.input_quantizer.axis == 1
    assert "A: lsq_plus asym int8/tensor" in report["blocks.0.0"].line()


def test_weight_none_quantizes_only_activations():
    model, report = prepare(Net(), QuantSpec(weight=None, activation=default_activation_config(8)))
    assert model.head.weight_quantizer is None and model.head.input_quantizer is not None
    assert report["embed"].action == "skipped" and type(model.embed) is nn.Embedding  # ids are not activations
    assert report["embed"].reason == "no weight or activation quantization set"


def test_refuses_an_already_prepared_model():
    model, _ = prepare(Net(), QuantSpec(weight=W4))
    with pytest.raises(ValueError, match="already prepared"):
        prepare(model)


def test_nan_weight_raises_naming_the_layer():
    model = Net()
    with torch.no_grad():
        model.blocks[1][0].weight[3, 7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layer 'blocks\.1\.0' weight has 1 non-finite"):
        prepare(model)


def test_a_bare_layer_must_be_wrapped():
    with pytest.raises(ValueError, match="wrap it in a container"):
        prepare(nn.Linear(128, 4))


def test_parameters_are_shared_so_an_existing_optimizer_still_trains_them():
    model = Net()
    params_before = {name: p for name, p in model.named_parameters()}
    prepared, _ = prepare(model, QuantSpec(weight=W4))
    params_after = dict(prepared.named_parameters())
    for name, param in params_before.items():  # same names (weights keep their place), same objects
        assert params_after[name] is param


def test_unprepare_restores_float_outputs_exactly():
    model = Net().eval()
    image, ids = inputs()
    float_out = model(image, ids)
    prepare(model, QuantSpec(weight=W4, activation=default_activation_config(8)))
    quant_out = model(image, ids)
    assert not torch.equal(quant_out, float_out)
    unprepare(model)
    assert not any(isinstance(m, QuantModule) for m in model.modules())
    assert type(model.conv) is nn.Conv2d and type(model.embed) is nn.Embedding
    assert torch.equal(model(image, ids), float_out)
    prepare(model, QuantSpec(weight=W4))  # a float model again: prepare accepts it


def test_unprepare_fold_reproduces_weight_only_fake_quant_exactly():
    model = Net().eval()
    original = copy.deepcopy(model)
    image, ids = inputs()
    spec = QuantSpec(weight=QuantizerConfig(bits=4, group_size=64), rules=[QuantRule(type="Conv2d", bits=8)])
    prepare(model, spec)
    quant_out = model(image, ids)
    unprepare(model, fold=True)
    assert torch.equal(model(image, ids), quant_out)
    assert not torch.equal(model.head.weight, original.head.weight)  # folded: the quantized weights


def test_prepared_state_dict_restores_a_fresh_prepared_model():
    spec = QuantSpec(weight=W4, activation=default_activation_config(8))
    source, _ = prepare(Net(), spec)
    image, ids = inputs()
    source(image, ids)  # initializes the activation ranges
    with torch.no_grad():
        source.head.weight_quantizer.scale.mul_(1.1)
    source.blocks[0][0].input_quantizer.freeze()
    source.conv.weight_quantizer.disable()
    fresh, _ = prepare(Net(), spec)
    fresh.load_state_dict(source.state_dict())
    source.eval()
    fresh.eval()
    assert torch.equal(fresh(image, ids), source(image, ids))
    assert not fresh.blocks[0][0].input_quantizer.scale.requires_grad and not fresh.conv.weight_quantizer.enabled
    assert fresh.head.input_quantizer.initialized
