"""FakeQuantizer: layouts, exact agreement with the functional math, switches and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qat.config import ConfigError, QuantizerConfig
from qat.fake_quant import FakeQuantizer, activation_quantizer, weight_quantizer
from qat.functional import NonFiniteError, choose_qparams, effective_qparams, expand_qparam, fake_quantize
from qat.ste import lsq_fake_quantize


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def minmax(**kwargs) -> QuantizerConfig:
    return QuantizerConfig(**{"init": "minmax", "scale_dtype": "float32", **kwargs})


def slice_reference(x: torch.Tensor, cfg: QuantizerConfig, index_sets) -> torch.Tensor:
    """Quantize each slice of x on its own with its own min-max range (no broadcasting helpers)."""
    out = torch.empty_like(x)
    for index in index_sets:
        part = x[index]
        scale, zero = choose_qparams(part.min(), part.max(), cfg.bits, cfg.symmetric, cfg.is_signed)
        out[index] = fake_quantize(part, scale, zero, cfg.qmin, cfg.qmax)
    return out


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((5, 12), 1), ((5, 12), 0), ((6, 4, 3, 3), 1), ((6, 4, 3, 3), 0), ((2, 3, 7), 2), ((2, 3, 7), -1)],
)
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (8, False), (2, True)])
def test_per_channel_any_axis_matches_slice_by_slice(shape, axis, bits, symmetric):
    cfg = minmax(bits=bits, symmetric=symmetric, granularity="channel")
    x = torch.randn(shape)
    quantizer = FakeQuantizer(cfg, shape, axis=axis)
    assert quantizer.scale.shape == (shape[axis],)
    quantizer.init_from(x)
    slices = [(slice(None),) * (axis % len(shape)) + (c,) for c in range(shape[axis])]
    torch.testing.assert_close(quantizer(x), slice_reference(x, cfg, slices), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("shape", "group_size"), [((4, 256), 16), ((3, 512), 128), ((2, 512), 256), ((8, 4, 4, 4), 64)]
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_matches_slice_by_slice(shape, group_size, symmetric):
    cfg = minmax(bits=4, symmetric=symmetric, group_size=group_size)
    w = torch.randn(shape)
    quantizer = weight_quantizer(cfg, w)
    inputs = math.prod(shape[1:])
    assert quantizer.scale.shape == (shape[0], inputs // group_size)
    flat = w.reshape(shape[0], inputs)
    slices = [(r, slice(g, g + group_size)) for r in range(shape[0]) for g in range(0, inputs, group_size)]
    expected = slice_reference(flat, cfg, slices).reshape(shape)
    torch.testing.assert_close(quantizer(w), expected, atol=0, rtol=0)


def test_parameters_exist_from_init_with_the_right_learnability():
    for kind, learn_scale, learn_zero in [("lsq", True, False), ("lsq_plus", True, True), ("observer", False, False)]:
        cfg = QuantizerConfig(quantizer=kind, symmetric=kind != "lsq_plus", group_size=32)
        quantizer = FakeQuantizer(cfg, (4, 64))
        names = dict(quantizer.named_parameters())
        assert set(names) == {"scale", "zero_point"} and names["scale"].shape == (4, 2)
        assert quantizer.scale.requires_grad is learn_scale and quantizer.zero_point.requires_grad is learn_zero


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_qparams_reproduce_forward_exactly(granularity, scale_dtype):
    cfg = QuantizerConfig(
        bits=4, symmetric=False, quantizer="lsq_plus", granularity=granularity, group_size=32, scale_dtype=scale_dtype
    )
    w = torch.randn(6, 64)
    quantizer = weight_quantizer(cfg, w)
    with torch.no_grad():  # move the learnable qparams off any value they were initialized to
        quantizer.scale.mul_(1 + 0.01 * torch.rand_like(quantizer.scale))
        quantizer.zero_point.add_(0.4 * torch.randn_like(quantizer.zero_point))
    scale, zero = quantizer.qparams()
    assert scale.shape == quantizer.scale.shape and not scale.requires_grad
    view = w.reshape(6, -1, 32) if granularity == "group" else w
    s, z = (expand_qparam(p, granularity, view.dim()) for p in (scale, zero))
    expected = fake_quantize(view, s, z, cfg.qmin, cfg.qmax).reshape(w.shape)
    assert torch.equal(quantizer(w), expected)


def test_forward_rounds_scales_to_float16():
    quantizer = FakeQuantizer(QuantizerConfig(granularity="tensor"), (64,))  # fp16 scales by default
    with torch.no_grad():
        quantizer.scale.fill_(0.1234567)
    quantizer.initialized = True
    x = torch.linspace(-0.9, 0.9, 64)
    rounded = torch.tensor(0.1234567).half().float()
    zero = torch.tensor(0.0)
    assert torch.equal(quantizer(x), fake_quantize(x, rounded, zero, -8, 7))
    assert not torch.equal(quantizer(x), fake_quantize(x, torch.tensor(0.1234567), zero, -8, 7))
    assert quantizer.qparams()[0].item() == rounded.item()


def test_scale_gradient_is_summed_per_group_with_lsq_factor():
    cfg = QuantizerConfig(bits=4, group_size=16, scale_dtype="float32")
    w = torch.randn(3, 64, requires_grad=True)
    quantizer = weight_quantizer(cfg, w.detach())
    with torch.no_grad():
        quantizer.scale.mul_(0.7)  # make some elements clip
    grad = torch.randn(3, 64)
    quantizer(w).backward(grad)
    factor = 1 / math.sqrt(16 * 7)
    for row in range(3):
        for group in range(4):
            cols = slice(16 * group, 16 * group + 16)
            scale = quantizer.scale.detach()[row, group].clone().requires_grad_(True)
            lsq_fake_quantize(w.detach()[row, cols], scale, torch.tensor(0.0), -8, 7).backward(grad[row, cols])
            torch.testing.assert_close(quantizer.scale.grad[row, group], scale.grad * factor, rtol=1e-6, atol=1e-7)


def test_switches_enable_disable_freeze():
    cfg = QuantizerConfig(quantizer="lsq_plus", symmetric=False, granularity="tensor")
    quantizer = FakeQuantizer(cfg, (8,))
    x = torch.randn(8)
    quantizer.init_from(x)
    assert quantizer.disable() is quantizer and quantizer(x) is x
    assert not torch.equal(quantizer.enable()(x), x)
    quantizer.freeze()
    assert not quantizer.scale.requires_grad and not quantizer.zero_point.requires_grad
    quantizer.freeze(False)
    assert quantizer.scale.requires_grad and quantizer.zero_point.requires_grad


def test_calibration_passes_through_then_sets_range():
    quantizer = activation_quantizer(minmax(bits=8, symmetric=False, quantizer="lsq_plus", granularity="tensor"), 4, -1)
    quantizer.start_calibration()
    batches = [torch.randn(3, 4), torch.randn(3, 4) * 2]
    for batch in batches:
        assert quantizer(batch) is batch
    assert not quantizer.initialized
    quantizer.finish_calibration()
    data = torch.cat(batches)
    scale, zero = choose_qparams(data.min(), data.max(), 8, False)
    assert quantizer.initialized and not quantizer.calibrating
    assert torch.equal(quantizer.scale.detach(), scale) and torch.equal(quantizer.zero_point.detach(), zero)


def test_first_batch_initializes_an_uninitialized_quantizer():
    quantizer = activation_quantizer(minmax(bits=8, granularity="tensor"), 16, -1)
    first = torch.randn(4, 16)
    out = quantizer(first)
    scale, _ = choose_qparams(first.min(), first.max(), 8, True)
    assert quantizer.initialized and torch.equal(quantizer.scale.detach(), scale)
    assert torch.equal(out, fake_quantize(first, scale, torch.tensor(0.0), -128, 127))
    quantizer(first * 10)  # later batches do not re-initialize an LSQ quantizer
    assert torch.equal(quantizer.scale.detach(), scale)


def test_observer_kind_updates_in_training_only_when_not_frozen():
    quantizer = activation_quantizer(minmax(bits=8, quantizer="observer", granularity="tensor"), 4, -1)
    quantizer(torch.ones(2, 4))
    first = quantizer.scale.detach().clone()
    quantizer(torch.ones(2, 4) * 3)
    trained = quantizer.scale.detach().clone()
    assert trained.item() == pytest.approx(first.item() * 3)  # running max moved from 1 to 3
    quantizer.eval()
    quantizer(torch.ones(2, 4) * 10)
    assert torch.equal(quantizer.scale.detach(), trained)
    quantizer.train().freeze()
    quantizer(torch.ones(2, 4) * 10)
    assert torch.equal(quantizer.scale.detach(), trained)
    quantizer.freeze(False)
    quantizer(torch.ones(2, 4) * 10)
    assert quantizer.scale.item() == pytest.approx(first.item() * 10)


def test_extra_state_round_trip_restores_flags_and_requires_grad():
    cfg = QuantizerConfig(quantizer="lsq_plus", symmetric=False, group_size=16)
    source = weight_quantizer(cfg, torch.randn(4, 32))
    source.freeze().disable()
    state = source.state_dict()
    assert state["_extra_state"] == {"enabled": False, "calibrating": False, "frozen": True, "initialized": True}
    fresh = FakeQuantizer(cfg, (4, 32))
    assert fresh.scale.requires_grad and not fresh.initialized
    fresh.load_state_dict(state)
    assert (fresh.enabled, fresh.frozen, fresh.initialized) == (False, True, True)
    assert not fresh.scale.requires_grad and not fresh.zero_point.requires_grad
    assert torch.equal(fresh.scale, source.scale) and torch.equal(fresh.observer.hi, source.observer.hi)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_groups_give_finite_positive_scales(scale_dtype, symmetric):
    cfg = QuantizerConfig(bits=4, symmetric=symmetric, group_size=16, scale_dtype=scale_dtype)
    w = torch.randn(5, 32)
    w[0, :16] = 0.0  # all zero
    w[1, :16] = 2.5  # constant positive
    w[2, :16] = -3.0  # constant negative
    w[3, :16] = torch.linspace(-1, 1, 16) * 1e-40  # denormal
    w[4, :16] = 1e-45  # smallest denormal, constant
    quantizer = weight_quantizer(cfg, w)
    scale, _ = quantizer.qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    out = quantizer(w)
    assert torch.isfinite(out).all()
    assert (out[0, :16] == 0).all() and (out[3:, :16].abs() <= scale[3:, :1]).all()
    torch.testing.assert_close(out[1:3, :16], w[1:3, :16], atol=0.2, rtol=0)  # within half a step of 2.5 / 7


def test_non_finite_tensors_raise():
    with pytest.raises(NonFiniteError):
        weight_quantizer(QuantizerConfig(group_size=16), torch.tensor([[float("nan")] + [0.0] * 15]))
    quantizer = activation_quantizer(minmax(granularity="tensor"), 2, -1)
    with pytest.raises(NonFiniteError, match="observed tensor"):
        quantizer(torch.tensor([[1.0, float("inf")]]))  # first-batch initialization
    assert not quantizer.initialized


def test_activation_quantizer_layouts():
    per_feature = activation_quantizer(minmax(granularity="channel"), 8, -1)
    assert per_feature.scale.shape == (8,)
    x = torch.randn(2, 5, 8)
    slices = [(slice(None), slice(None), c) for c in range(8)]
    torch.testing.assert_close(per_feature(x), slice_reference(x, per_feature.config, slices), atol=0, rtol=0)
    conv = activation_quantizer(minmax(granularity="channel"), 3, 1)
    assert conv.scale.shape == (3,) and conv(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ConfigError, match="granularity='group' is not supported"):
        activation_quantizer(QuantizerConfig(granularity="group"), 8, -1)


def test_effective_qparams_used_by_qparams_method():
    cfg = QuantizerConfig(bits=4, symmetric=False, quantizer="lsq_plus", granularity="tensor")
    quantizer = FakeQuantizer(cfg, (4,))
    with torch.no_grad():
        quantizer.scale.fill_(1e-9)
        quantizer.zero_point.fill_(40.0)
    s, z = quantizer.qparams()
    ref_s, ref_z = effective_qparams(torch.tensor(1e-9), torch.tensor(40.0), 0, 15, torch.float16)
    assert s.item() == ref_s.item() == torch.finfo(torch.float16).tiny and z.item() == ref_z.item() == 15


def test_init_from_an_unchanged_weight_is_skipped_and_any_write_redoes_it(monkeypatch):
    import pickle

    weight = nn.Parameter(torch.randn(8, 32))
    quantizer = FakeQuantizer(QuantizerConfig(group_size=16, init="mse"), tuple(weight.shape))
    calls = []
    observe = FakeQuantizer.observe
    monkeypatch.setattr(FakeQuantizer, "observe", lambda self, x: (calls.append(1), observe(self, x)))
    quantizer.init_from(weight)
    quantizer.init_from(weight)  # same tensor, nothing written since: the search is not repeated
    assert len(calls) == 1
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step writes in place
    quantizer.init_from(weight)
    with torch.no_grad():
        quantizer.scale.fill_(1.0)  # so does setting a scale by hand
    quantizer.init_from(weight)
    quantizer.init_from(weight.detach().clone())  # another tensor with the same values
    assert len(calls) == 4
    assert pickle.loads(pickle.dumps(quantizer))._init_source is None
