"""Dispatch: automatic choice, forcing by argument or environment, errors, per-layer caches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qat.kernels import cpu, dispatch, gemv_f32, int8_act
from qat.kernels.dispatch import BACKENDS, ENV_VAR, choose_backend, int4_linear, int4_linear_prepared, prepare_weights
from qat.kernels.reference import int4_linear_reference
from qat.kernels.weights import PackedInt4Weight, cached_weight

from tests.kernels.helpers import assert_bitwise_equal, make_layer

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"


@pytest.fixture
def layer():
    packed, scales, zeros = make_layer(32, 128, 32)
    return packed, scales, zeros, 32


def test_unknown_backend_lists_the_available_ones(layer, monkeypatch):
    x = torch.randn(2, 128)
    listing = (r"unknown int4 kernel backend 'tinygemm'.*available: auto, cpu_bf16_cached, cpu_blocked, "
               r"cpu_blocked_bf16, cpu_gemv_f32, cpu_int4pack, cpu_int8_act, cpu_small_m, dequant")
    with pytest.raises(ValueError, match=listing):
        int4_linear(x, *layer, backend="tinygemm")
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=rf"'nope' \(from backend= or \${ENV_VAR}\).*dequant_cached"):
        int4_linear(x, *layer)


def test_environment_forces_a_backend_and_argument_wins(layer, monkeypatch):
    calls = []
    monkeypatch.setitem(BACKENDS, "spy", dispatch.Backend("spy", lambda x, w, b: calls.append("spy") or x,
                                                          lambda x, w: None))
    monkeypatch.setenv(ENV_VAR, "spy")
    x = torch.randn(2, 128)
    int4_linear(x, *layer)
    assert calls == ["spy"]
    assert_bitwise_equal(int4_linear(x, *layer, backend="reference"), int4_linear_reference(x, *layer))
    assert calls == ["spy"]
    monkeypatch.setenv(ENV_VAR, "auto")
    int4_linear(x, *layer)
    assert calls == ["spy"]


def test_automatic_choice_on_cpu(monkeypatch):
    """Autotuning off: the static rule; group sizes int4pack cannot run stay on the exact `dequant`."""
    monkeypatch.setenv("QAT_KERNEL_AUTOTUNE", "0")
    packed, scales, zeros = make_layer(32, 128, 32)
    x, weight = torch.randn(1, 128), PackedInt4Weight(packed, scales, zeros, 32)
    expected = "cpu_int4pack" if cpu.int4pack_available() else "dequant"
    assert choose_backend(torch.randn(5, 128), weight) == expected
    if cpu.int4pack_available() and gemv_f32.gemv_f32_unsupported(x, weight) is None:
        expected = "cpu_gemv_f32"  # an AVX2 CPU's float kernel for 1-4 rows
    assert choose_backend(x, weight) == expected
    if cpu.int4pack_available():
        assert choose_backend(torch.randn(129, 128), PackedInt4Weight(packed, scales, zeros, 32)) == "cpu_blocked_bf16"
    packed16, scales16, zeros16 = make_layer(32, 128, 16)
    assert choose_backend(x, PackedInt4Weight(packed16, scales16, zeros16, 16)) == "dequant"
    assert choose_backend(x.bfloat16(), PackedInt4Weight(packed16, scales16, zeros16, 16)) == "dequant"
    assert_bitwise_equal(int4_linear(x, packed16, scales16, zeros16, 16),
                         int4_linear_reference(x, packed16, scales16, zeros16, 16))


def test_cpu_dense_cache_above_a_row_count_is_opt_in(layer, monkeypatch):
    weight = PackedInt4Weight(*layer)
    large = torch.randn(65, 128)
    assert choose_backend(large, weight) != "cpu_bf16_cached"
    monkeypatch.setattr(dispatch, "CPU_CACHE_DENSE_ABOVE_M", 64)
    assert choose_backend(large, weight) == "cpu_bf16_cached"
    assert choose_backend(large[:64], weight) != "cpu_bf16_cached"


def test_forced_backend_that_cannot_run_says_why(layer):
    with pytest.raises(ValueError, match=r"'triton' cannot run this layer: .*(CUDA|not installed)"):
        int4_linear(torch.randn(1, 128), *layer, backend="triton")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, s, z, g: (p.to(torch.int8), s, z, g), "packed must be a 2-D uint8"),
        (lambda p, s, z, g: (p, s, z, 48), "group_size 48 must be a positive int dividing K = 128"),
        (lambda p, s, z, g: (p, s[:, :2], z, g), r"scales have shape \(32, 2\), expected \(32, 4\)"),
        (lambda p, s, z, g: (p, s.to(torch.int32), z, g), "scales must be float16, bfloat16 or float32"),
        (lambda p, s, z, g: (p, s, z.to(torch.int32), g), "zeros must be uint8"),
        (lambda p, s, z, g: (p, s, z[:3], g), r"zeros have shape \(3, 4\)"),
    ],
)
def test_bad_layouts_are_named(layer, change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        int4_linear(torch.randn(1, 128), *change(*layer))


def test_bad_activations_and_bias_are_named(layer):
    with pytest.raises(ValueError, match="last dimension must be K = 128"):
        int4_linear(torch.randn(1, 64), *layer)
    with pytest.raises(TypeError, match="floating-point"):
        int4_linear(torch.ones(1, 128, dtype=torch.int32), *layer)
    with pytest.raises(ValueError, match=r"bias has shape \(31,\), expected \(32,\)"):
        int4_linear(torch.randn(1, 128), *layer, bias=torch.randn(31))


def test_forms_are_cached_per_layer_and_rebuilt_after_in_place_writes(layer):
    packed, scales, zeros, group_size = layer
    x = torch.randn(3, 128)
    first = int4_linear(x, packed, scales, zeros, group_size, backend="dequant_cached")
    weight = cached_weight(packed, scales, zeros, group_size)
    cached = weight.form(f"dequantized:{x.dtype}", lambda w: pytest.fail("should be cached"))
    int4_linear(x, packed, scales, zeros, group_size, backend="dequant_cached")
    assert cached_weight(packed, scales, zeros, group_size) is weight
    assert weight.form(f"dequantized:{x.dtype}", lambda w: None) is cached
    packed.copy_(packed ^ 0x11)  # a checkpoint loaded in place: every code changes
    second = int4_linear(x, packed, scales, zeros, group_size, backend="dequant_cached")
    assert not torch.equal(first, second)
    assert_bitwise_equal(second, int4_linear_reference(x, packed, scales, zeros, group_size))


def test_prepare_weights_builds_the_form_now_and_runs():
    packed, scales, zeros = make_layer(48, 256, 64)
    bias = torch.randn(48)
    weight = prepare_weights(packed, scales, zeros, 64, backend="dequant_cached", bias=bias)
    assert "dequantized:torch.float32" not in repr(weight)  # dequant_cached builds per dtype on first call
    if cpu.int4pack_available():
        assert "cpu_int4pack" in repr(prepare_weights(packed, scales, zeros, 64, backend="cpu_int4pack"))
    x = torch.randn(2, 256)
    assert_bitwise_equal(int4_linear_prepared(x, weight, backend="dequant"),
                         int4_linear_reference(x, packed, scales, zeros, 64, bias))
    weight.drop_forms()
    assert "forms=[]" in repr(weight)


def test_kernels_import_with_torch_alone():
    """The kernels folder, loaded as a standalone package, pulls in neither qat nor triton nor Lightning."""
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("standalone_kernels", {str(KERNELS_DIR / "__init__.py")!r},
                                              submodule_search_locations=[{str(KERNELS_DIR)!r}])
module = importlib.util.module_from_spec(spec); sys.modules["standalone_kernels"] = module
spec.loader.exec_module(module)
import standalone_kernels.dispatch, standalone_kernels.bench, standalone_kernels.weights, standalone_kernels.cpu
loaded = sorted(name for name in ("qat", "triton", "lightning", "pytorch_lightning", "omegaconf", "wandb")
                if name in sys.modules)
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_auto_dispatch_chooses_once_per_layer_and_m(monkeypatch) -> None:
    """A decode step calls each layer with the same M: the choice (and its checks) runs once, not per call."""
    packed, scales, zeros = make_layer(32, 128, 64)
    weight = PackedInt4Weight(packed, scales, zeros, 64)
    calls = []
    real = dispatch.choose_backend
    monkeypatch.setattr(dispatch, "choose_backend", lambda x, w: calls.append(x.shape) or real(x, w))
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("QAT_INT8_ACTIVATIONS", raising=False)
    one, four = torch.randn(1, 128), torch.randn(4, 128)
    first = dispatch.int4_linear_prepared(one, weight)
    assert torch.equal(dispatch.int4_linear_prepared(one, weight), first)
    dispatch.int4_linear_prepared(four, weight)
    dispatch.int4_linear_prepared(four, weight)
    assert calls == [(1, 128), (4, 128)]  # once per M
    monkeypatch.setattr(dispatch, "CPU_CACHE_DENSE_ABOVE_M", 2)  # a setting the choice depends on
    dispatch.int4_linear_prepared(four, weight)
    assert len(calls) == 3 and weight.auto_choices[(torch.float32, torch.device("cpu"), 4, 2, True, "bf16")] == \
        "cpu_bf16_cached"
    monkeypatch.setattr(dispatch, "CPU_CACHE_DENSE_ABOVE_M", None)
    monkeypatch.setenv("QAT_INT8_ACTIVATIONS", "all")  # so is the int8-activation policy
    dispatch.int4_linear_prepared(four, weight)
    assert len(calls) == 4
    monkeypatch.setenv(ENV_VAR, "reference")  # a named backend bypasses the remembered choice
    expected = int4_linear_reference(one, packed, scales, zeros, 64)
    assert torch.equal(dispatch.int4_linear_prepared(one, weight), expected)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["dequant", "reference", "cpu_int4pack", "cpu_int8_act", None])
@pytest.mark.parametrize("rows_shape", [(1,), (3,), (2, 3)])
@pytest.mark.parametrize("out_features, biased", [(32, False), (20, True)])  # 20: int4pack pads rows to 32
def test_bound_call_equals_the_dispatched_call(backend, rows_shape, out_features, biased, x_dtype):
    if backend == "cpu_int4pack" and not cpu.int4pack_available():
        pytest.skip("no vectorized int4pack kernel on this CPU")
    packed, scales, zeros = make_layer(out_features, 128, 32)
    if backend == "cpu_int8_act" and int8_act.int8_act_unsupported(torch.zeros(1, 128),
                                                                   PackedInt4Weight(packed, scales, zeros, 32)):
        pytest.skip("no int8-activation kernel here")
    bias = torch.randn(out_features).to(x_dtype) if biased else None
    weight = prepare_weights(packed, scales, zeros, 32, bias=bias)
    x = torch.randn(*rows_shape, 128).to(x_dtype)
    bound = dispatch.bind(x, weight, backend=backend)
    for inputs in (x, torch.randn(*rows_shape, 128).to(x_dtype)):  # same signature, other values
        assert_bitwise_equal(bound(inputs), dispatch.int4_linear_prepared(inputs, weight, backend=backend))


def test_bind_checks_and_refuses_once(layer):
    weight = prepare_weights(*layer)
    with pytest.raises(ValueError, match="last dimension must be K = 128"):
        dispatch.bind(torch.randn(1, 64), weight)
    with pytest.raises(ValueError, match="'triton' cannot run this layer"):
        dispatch.bind(torch.randn(1, 128), weight, backend="triton")
