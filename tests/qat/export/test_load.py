"""export_model -> qat.load: the loaded model computes exactly what the fake-quant model computes.

fp32: bitwise equal outputs. bf16: the fake-quant model run under CPU autocast (float32
master weights, bf16 compute, the usual way of running a QAT model in bf16) against the
loaded model with dtype=bf16: bitwise equal for models made of the quantized layer types
and ReLU (other layers such as LayerNorm follow their own autocast rules; see FORMAT.md).
"""

from __future__ import annotations

import pytest
import safetensors
import torch
from conftest import assert_bitwise_equal, make_prepared
from export_test_models import MLP, ConvNet, EmbedMLP, TinyLM
from qat.kernels import dispatch
from torch import nn

import qat
from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.export import ArchitectureError, PackedConv2d, PackedLinear, export_model
from qat.export.runtime import InputQuantizer, dynamic_per_token


def minmax(**options) -> QuantizerConfig:
    return QuantizerConfig(init="minmax", **options)


# Range init is "minmax" throughout: the init method does not touch export (test_pack covers "mse"),
# and the MSE search dominates the run time of these tests on a busy 2-core machine.
CHANNEL_ACT = QuantizerConfig(bits=8, symmetric=False, granularity="channel", quantizer="lsq_plus", init="minmax",
                              scale_dtype="float32")
MLP_SPECS = {
    "int4-g32-sym": QuantSpec(weight=minmax(group_size=32)),
    "int3-g16-asym-a8": QuantSpec(weight=minmax(bits=3, symmetric=False, quantizer="lsq_plus",
                                                         group_size=16, scale_dtype="bfloat16"),
                                  activation=default_activation_config(8)),
    "int8-channel-a6-channel": QuantSpec(weight=minmax(bits=8, granularity="channel", scale_dtype="float32"),
                                         activation=QuantizerConfig(**{**CHANNEL_ACT.__dict__, "bits": 6})),
    "int2-tensor-unsigned": QuantSpec(weight=minmax(bits=2, symmetric=True, signed=False,
                                                             granularity="tensor")),
    "mixed-rules": QuantSpec(weight=minmax(group_size=64), activation=default_activation_config(8),
                             rules=[QuantRule(name="fc2", bits=5, granularity="channel"),
                                    QuantRule(name="fc3", quantize_activations=False)]),
}
CONV_SPEC = QuantSpec(weight=minmax(group_size=32), activation=default_activation_config(8),
                      rules=[QuantRule(type="Conv2d", granularity="channel"),
                             QuantRule(name="conv2", activation_bits=4)])


def roundtrip(model, path, architecture, **load_options):
    report = export_model(model, path, architecture=architecture, recipe_hash="cafe")
    return report, qat.load(path, **load_options)


@pytest.mark.parametrize("name", sorted(MLP_SPECS))
def test_mlp_outputs_match_bitwise_fp32_and_bf16(name, checkpoint_path):
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(5, 64) * 2
        model = make_prepared(MLP(), MLP_SPECS[name], seed, calibrate_with=x)
        _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"})
        probe = torch.randn(7, 3, 64) * 2
        with torch.no_grad():
            assert_bitwise_equal(loaded(probe), model(probe))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = model(probe.bfloat16())
        loaded_bf16 = qat.load(checkpoint_path, dtype=torch.bfloat16)
        with torch.no_grad():
            assert_bitwise_equal(loaded_bf16(probe.bfloat16()), expected)


def test_convnet_outputs_match_bitwise(checkpoint_path):
    for seed in range(3):
        torch.manual_seed(seed)
        images = torch.randn(2, 3, 12, 12)
        model = make_prepared(ConvNet(), CONV_SPEC, seed, calibrate_with=images)
        _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models:ConvNet", "classes": 10})
        assert isinstance(loaded.conv1, PackedConv2d) and loaded.conv1.spec.weight.layout == "uint8"  # K = 27
        probe = torch.randn(3, 3, 10, 10)
        with torch.no_grad():
            assert_bitwise_equal(loaded(probe), model(probe))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = model(probe.bfloat16())
        with torch.no_grad():
            assert_bitwise_equal(qat.load(checkpoint_path, dtype=torch.bfloat16)(probe.bfloat16()), expected)


def test_embedding_model_matches_bitwise_fp32_and_bf16(checkpoint_path):
    spec = QuantSpec(weight=minmax(group_size=16, symmetric=False, quantizer="lsq_plus"))
    for seed in range(3):
        torch.manual_seed(seed)
        model = make_prepared(EmbedMLP(), spec, seed)
        _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.EmbedMLP"})
        ids = torch.randint(0, 40, (4, 9))
        with torch.no_grad():
            assert_bitwise_equal(loaded(ids), model(ids))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = model(ids)
            assert_bitwise_equal(qat.load(checkpoint_path, dtype=torch.bfloat16)(ids), expected)


def test_tied_head_layernorm_and_nonpersistent_buffer(checkpoint_path):
    # tied layers are quantized together or not at all (prepare refuses a mix): here both stay float
    spec = QuantSpec(weight=minmax(group_size=16), rules=[QuantRule(name="head|embed", skip=True)])
    model = make_prepared(TinyLM(), spec, seed=0)
    with torch.no_grad():
        model.position_scale.mul_(3.0)  # a non-persistent buffer changed after construction is stored
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.TinyLM"})
    assert type(loaded.embed) is nn.Embedding and type(loaded.head) is nn.Linear
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded.position_scale, model.position_scale)
    ids = torch.randint(0, 48, (2, 11))
    with torch.no_grad():
        assert_bitwise_equal(loaded(ids), model(ids))


def test_bf16_with_layernorm_stays_within_bf16_rounding_of_autocast(checkpoint_path):
    # Under autocast LayerNorm keeps float32 parameters; the bf16 model rounds them to bf16. That
    # rounding (2^-8 relative) through LN and two Linear layers gave at most 0.8 % of the largest
    # output magnitude over 5 seeds; 3 % leaves room without hiding a real error (a wrong code is
    # a full quantization step, 10 % or more of a weight).
    spec = QuantSpec(weight=minmax(group_size=16))
    for seed in range(3):
        torch.manual_seed(seed)
        model = make_prepared(TinyLM(), spec, seed)
        _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.TinyLM"}, dtype=torch.bfloat16)
        ids = torch.randint(0, 48, (4, 16))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(ids).float()
        with torch.no_grad():
            actual = loaded(ids).float()
        assert (actual - expected).abs().max() <= 0.03 * expected.abs().max()


def test_ties_recorded_in_the_file_are_restored_on_an_untied_skeleton(checkpoint_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    model[2].weight = model[1].weight
    model, _ = qat.prepare(model, QuantSpec(weight=minmax(group_size=16), rules=[QuantRule(name="[12]",
                                                                                                      skip=True)]))
    export_model(model, checkpoint_path)  # no architecture recorded
    with pytest.raises(ArchitectureError, match="records no architecture"):
        qat.load(checkpoint_path)
    skeleton = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    loaded = qat.load(checkpoint_path, model=skeleton)
    assert loaded is skeleton and loaded[1].weight is loaded[2].weight
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), model.eval()(x))


def test_quantized_layers_hold_only_packed_buffers(checkpoint_path):
    model = make_prepared(TinyLM(), QuantSpec(weight=minmax(group_size=16)), seed=1)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.TinyLM"})
    for module in (loaded.embed, loaded.up, loaded.down, loaded.head):
        assert not hasattr(module, "weight")
        names = {name for name, _ in module.named_buffers()}
        assert names <= {"weight_packed", "weight_scales", "weight_zeros", "kernel_zeros"}
        assert all(not p.requires_grad for p in module.parameters())
    # The model's tensors are exactly the file's tensors: nothing dequantized is kept.
    with safetensors.safe_open(checkpoint_path, framework="pt") as handle:
        file_bytes = sum(handle.get_tensor(key).nbytes for key in handle.keys())  # noqa: SIM118
    unique = {id(t): t for t in [*loaded.parameters(), *loaded.buffers()]}
    assert sum(t.nbytes for t in unique.values()) == file_bytes


def test_safetensors_library_reads_the_same_tensors(checkpoint_path):
    model = make_prepared(MLP(), MLP_SPECS["int3-g16-asym-a8"], seed=2, calibrate_with=torch.randn(4, 64))
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"})
    state = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    with safetensors.safe_open(checkpoint_path, framework="pt") as handle:
        assert set(handle.keys()) == set(state)
        for key in handle.keys():  # noqa: SIM118
            assert torch.equal(handle.get_tensor(key), state[key])


def test_int4_linear_layers_call_the_dispatch_entry_point(checkpoint_path, monkeypatch):
    calls = []
    entry_point = dispatch.int4_linear

    def spy(x, packed, scales, zeros, group_size, bias=None, backend=None):
        calls.append((packed.dtype, tuple(packed.shape), group_size, backend))
        return entry_point(x, packed, scales, zeros, group_size, bias, backend=backend)

    monkeypatch.setattr(dispatch, "int4_linear", spy)
    model = make_prepared(MLP(), MLP_SPECS["int4-g32-sym"], seed=0)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"}, kernel_backend="reference")
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), model(x))
    assert calls == [(torch.uint8, (128, 32), 32, "reference"), (torch.uint8, (128, 64), 32, "reference"),
                     (torch.uint8, (32, 64), 32, "reference")]


def test_low_bit_symmetric_layers_pass_their_implied_zero_to_the_kernel(checkpoint_path):
    model = make_prepared(MLP(), QuantSpec(weight=minmax(bits=3, group_size=32)), seed=0)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"})
    assert loaded.fc1.weight_zeros is None and int(loaded.fc1.kernel_zeros.unique()) == 4  # -qmin of int3
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), model(x))


def test_activation_only_layers_keep_their_float_weight_and_input_fake_quant(checkpoint_path):
    spec = QuantSpec(weight=None, activation=default_activation_config(8))
    x = torch.randn(6, 64)
    model = make_prepared(MLP(), spec, seed=3, calibrate_with=x)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"})
    assert type(loaded.fc1) is nn.Linear and isinstance(loaded.fc1.input_quantizer, InputQuantizer)
    with torch.no_grad():
        assert_bitwise_equal(loaded(x * 3), model(x * 3))


def test_disabled_activation_quantizers_are_not_recorded(checkpoint_path):
    x = torch.randn(6, 64)
    model = make_prepared(MLP(), MLP_SPECS["int3-g16-asym-a8"], seed=4, calibrate_with=x)
    qat.set_fake_quant(model, activations=False)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"})
    assert loaded.fc1.input_quantizer is None
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), model(x))


def test_trained_model_exports_exactly(checkpoint_path):
    torch.manual_seed(5)
    spec = QuantSpec(weight=minmax(bits=4, symmetric=False, quantizer="lsq_plus", group_size=16),
                     activation=default_activation_config(8))
    x, target = torch.randn(32, 64), torch.randn(32, 32)
    model, _ = qat.prepare(MLP(), spec)
    qat.calibrate(model, [x])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"})
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), model(x))


def test_dynamic_per_token_activation_option(checkpoint_path):
    model = make_prepared(MLP(), MLP_SPECS["int4-g32-sym"], seed=6)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"},
                          dynamic_activation_bits=8)
    x = torch.randn(4, 5, 64)
    # Hand reference: per-row scale max|x| / 127, symmetric codes in [-128, 127].
    scale = x.abs().amax(-1, keepdim=True) / 127
    expected_input = torch.clamp(torch.round(x / scale), -128, 127) * scale
    assert torch.equal(dynamic_per_token(x, 8), expected_input)
    assert loaded.fc1.dynamic_activation_bits == 8
    with torch.no_grad():
        first = loaded.fc1(x)
        weight, bias = loaded.fc1.dequantized_weight(), loaded.fc1.bias
        assert torch.equal(first, nn.functional.linear(expected_input, weight, bias))
        static = qat.load(checkpoint_path)(x)
        # int8 per token: relative L2 error under 2 % on random inputs (measured 0.8-0.9 %, 5 seeds)
        assert (loaded(x) - static).norm() / static.norm() < 0.02
    with pytest.raises(ValueError, match="dynamic_activation_bits"):
        qat.load(checkpoint_path, dynamic_activation_bits=16)


def test_load_dtype_casts_plain_tensors_only(checkpoint_path):
    model = make_prepared(TinyLM(), QuantSpec(weight=minmax(group_size=16, scale_dtype="float32")), seed=0)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.TinyLM"}, dtype=torch.bfloat16)
    assert loaded.norm.weight.dtype == torch.bfloat16 and loaded.up.bias.dtype == torch.bfloat16
    assert loaded.up.weight_scales.dtype == torch.float32 and loaded.up.weight_packed.dtype == torch.uint8
    assert loaded(torch.randint(0, 48, (1, 4))).dtype == torch.bfloat16


def test_embedding_rejects_out_of_range_ids(checkpoint_path):
    model = make_prepared(EmbedMLP(), QuantSpec(weight=minmax(group_size=16)), seed=0)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.EmbedMLP"})
    for bad in (-1, 40):
        with pytest.raises(IndexError):
            loaded.embed(torch.tensor([0, bad]))


def test_size_report_int4_g128_fp16(tmp_path):
    model, _ = qat.prepare(nn.Sequential(nn.Linear(512, 256, bias=False)), QuantSpec())
    path = tmp_path / "m.safetensors"
    report = export_model(model, path)
    weights = 512 * 256
    assert report.quantized_weights == weights
    assert report.quantized_bytes == weights // 2 + 2 * weights // 128  # codes + fp16 scales, no zeros
    assert report.bits_per_weight == 4.125 and report.ratio_vs_fp32 == 32 / 4.125 >= 7.5
    assert report.ratio_vs_bf16 == 16 / 4.125
    assert report.file_bytes == path.stat().st_size == report.header_bytes + report.quantized_bytes
    text = str(report)
    assert "4.125 bits/weight" in text and "7.76x" in text and "3.88x" in text
    assert isinstance(qat.load(path, model=nn.Sequential(nn.Linear(512, 256, bias=False)))[0], PackedLinear)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda_matches_the_fake_quant_model_there(checkpoint_path):
    x = torch.randn(6, 64)
    model = make_prepared(MLP(), MLP_SPECS["int3-g16-asym-a8"], seed=7, calibrate_with=x)
    _, loaded = roundtrip(model, checkpoint_path, {"_target_": "export_test_models.MLP"}, device="cuda",
                          kernel_backend="reference")
    assert all(t.device.type == "cuda" for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert_bitwise_equal(loaded(x.cuda()).cpu(), model.cuda()(x.cuda()).cpu())
