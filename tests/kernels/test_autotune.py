"""Measured dispatch on CPU: a valid backend for every combination, measured once per bucket, overridable."""

from __future__ import annotations

import pytest
import torch
from qat.kernels import autotune, cpu, gemv_f32, int8_act, small_m
from qat.kernels.dispatch import BACKENDS, ENV_VAR, SMALL_M_MAX_ROWS, choose_backend, cpu_candidates, int4_linear
from qat.kernels.weights import PackedInt4Weight

from tests.kernels.helpers import make_layer


@pytest.fixture(autouse=True)
def fresh_choices():
    autotune.clear_choices()
    yield
    autotune.clear_choices()


def _weight(n: int, k: int, group: int, zero_points: bool = True, scale_dtype=torch.float16) -> PackedInt4Weight:
    return PackedInt4Weight(*make_layer(n, k, group, scale_dtype, zero_points), group)


@pytest.mark.parametrize("tune", ("1", "0"))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_dispatch_picks_a_backend_that_runs_for_every_combination(tune, x_dtype, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV_VAR, tune)
    layers = [(48, 192, 3), (48, 192, 16), (47, 192, 32), (48, 320, 64), (48, 384, 128), (48, 384, 384)]
    for (n, k, group), zero_points, scale_dtype, rows in zip(
        layers * 4, [True, False] * 12,
        [torch.float16, torch.bfloat16, torch.float32] * 8, [0, 1, 3, 17, 64, 2] * 4, strict=True
    ):
        weight = _weight(n, k, group, zero_points, scale_dtype)
        x = torch.randn(rows, k).to(x_dtype)
        name = choose_backend(x, weight)
        assert name in BACKENDS and BACKENDS[name].unsupported(x, weight) is None, (name, group, rows)
        expected = {"cpu_int4pack", "cpu_blocked", "cpu_blocked_bf16", "cpu_small_m"} if group % 32 == 0 \
            else {"dequant"}
        if group % 32 == 0 and x_dtype == torch.bfloat16:
            expected.add("cpu_int8_act")  # the default policy allows int8 activations for bf16 x
        if group % 32 == 0 and rows <= gemv_f32.MAX_ROWS:
            expected.add("cpu_gemv_f32")
        if not cpu.int4pack_available():
            expected = {"dequant"}
        assert name in expected, (name, group)
        assert int4_linear(x, weight.packed, weight.scales, weight.zeros, group).shape == (rows, n)


def test_candidates_depend_on_dtype_group_size_and_rows():
    weight = _weight(32, 128, 32)
    with_int4pack = ["cpu_int4pack"] if cpu.int4pack_available() else []
    blocked_f32 = ["cpu_blocked_bf16"] if with_int4pack else []
    blocked_bf16 = ["cpu_blocked"] if with_int4pack else []
    few = ["cpu_small_m"] if with_int4pack and small_m.small_m_unsupported(torch.randn(1, 128), weight) is None else []
    gemv = ["cpu_gemv_f32"] if with_int4pack and gemv_f32.gemv_f32_unsupported(torch.randn(1, 128), weight) is None \
        else []  # up to gemv_f32.MAX_ROWS rows
    assert cpu_candidates(torch.randn(1, 128), weight) == [*with_int4pack, *blocked_f32, *few, *gemv]
    int8 = ["cpu_int8_act"] if with_int4pack and int8_act.int8_act_unsupported(torch.randn(1, 128), weight) is None \
        else []  # bf16 x only, by the default policy
    assert cpu_candidates(torch.randn(1, 128).bfloat16(), weight) == [*with_int4pack, *blocked_bf16, *few, *gemv,
                                                                       *int8]
    assert cpu_candidates(torch.randn(gemv_f32.MAX_ROWS + 1, 128), weight) == [*with_int4pack, *blocked_f32, *few]
    assert cpu_candidates(torch.randn(SMALL_M_MAX_ROWS, 128), weight) == [*with_int4pack, *blocked_f32, *few]
    assert cpu_candidates(torch.randn(SMALL_M_MAX_ROWS + 1, 128), weight) == [*with_int4pack, *blocked_f32]
    assert cpu_candidates(torch.randn(SMALL_M_MAX_ROWS + 1, 128).bfloat16(), weight) == [
        *with_int4pack, *blocked_bf16, *int8]
    assert cpu_candidates(torch.randn(1, 128), _weight(32, 128, 16)) == []


def _spies(monkeypatch, slow: str | tuple[str, ...]) -> list[str]:
    """Replace the CPU candidates with counting stand-ins (all able to run); those in `slow` sleep 20 ms per call."""
    import time

    calls: list[str] = []

    def make(name: str):
        def run(x, weight, bias):
            calls.append(name)
            if name in ((slow,) if isinstance(slow, str) else slow):
                time.sleep(0.02)
            return x.new_zeros(*x.shape[:-1], weight.out_features)
        return run

    for name in ("cpu_int4pack", "cpu_blocked_bf16", "cpu_small_m"):
        monkeypatch.setitem(BACKENDS, name, BACKENDS[name].__class__(name, make(name), lambda x, w: None))
    return calls


def test_measures_once_per_bucket_and_keeps_the_fastest(monkeypatch):
    calls = _spies(monkeypatch, slow=("cpu_int4pack", "cpu_small_m"))
    weight = _weight(32, 128, 32)
    assert choose_backend(torch.randn(20, 128), weight) == "cpu_blocked_bf16"
    timed = len(calls)
    assert timed == 3 * (1 + autotune.AUTOTUNE_CALLS)  # one warm-up + timed calls per candidate (3 up to M = 64)
    assert choose_backend(torch.randn(31, 128), weight) == "cpu_blocked_bf16"  # same bucket (16-31): no timing
    assert len(calls) == timed
    choose_backend(torch.randn(SMALL_M_MAX_ROWS + 1, 128), weight)  # bucket 64-127, above SMALL_M_MAX_ROWS: 2 left
    assert len(calls) == timed + 2 * (1 + autotune.AUTOTUNE_CALLS)
    assert sorted(key[6] for key in autotune.measured_choices()) == [5, 7]


def test_autotune_off_uses_the_static_rule_without_timing(monkeypatch):
    calls = _spies(monkeypatch, slow="cpu_blocked_bf16")
    monkeypatch.setenv(autotune.AUTOTUNE_ENV_VAR, "0")
    weight = _weight(32, 128, 32)
    limit = autotune.STATIC_INT4PACK_MAX_M[torch.float32]
    assert choose_backend(torch.randn(limit, 128), weight) == "cpu_int4pack"
    assert choose_backend(torch.randn(limit + 1, 128), weight) == "cpu_blocked_bf16"
    gemv = gemv_f32.gemv_f32_unsupported(torch.zeros(1, 128), weight) is None  # an AVX2 CPU's float kernel
    for rows in (1, autotune.STATIC_GEMV_F32_MAX_M):
        assert choose_backend(torch.randn(rows, 128), weight) == ("cpu_gemv_f32" if gemv else "cpu_int4pack")
    for rows in (autotune.STATIC_GEMV_F32_MAX_M + 1, 7, 17, SMALL_M_MAX_ROWS):
        assert choose_backend(torch.randn(rows, 128), weight) == "cpu_int4pack"
    for rows in autotune.STATIC_SMALL_M_ROWS:
        assert choose_backend(torch.randn(rows, 128), weight) == "cpu_small_m"
    assert calls == [] and autotune.measured_choices() == {}


def test_static_rule_takes_int8_activations_wherever_the_policy_offers_them():
    for rows in (1, 16, 4096):
        x = torch.randn(rows, 128)
        assert autotune.static_choice(x, ["cpu_int4pack", "cpu_blocked", "cpu_small_m", "cpu_int8_act"]) == \
            "cpu_int8_act"
        assert autotune.static_choice(x, ["cpu_int4pack", "cpu_blocked"]) != "cpu_int8_act"


def test_forcing_a_backend_skips_measurement(monkeypatch):
    calls = _spies(monkeypatch, slow="cpu_int4pack")
    weight = _weight(32, 128, 32)
    x = torch.randn(4, 128)
    int4_linear(x, weight.packed, weight.scales, weight.zeros, 32, backend="cpu_int4pack")
    monkeypatch.setenv(ENV_VAR, "cpu_blocked_bf16")
    int4_linear(x, weight.packed, weight.scales, weight.zeros, 32)
    assert calls == ["cpu_int4pack", "cpu_blocked_bf16"] and autotune.measured_choices() == {}


def test_rows_bucket():
    assert [autotune.rows_bucket(m) for m in (0, 1, 2, 3, 4, 7, 8, 2048)] == [0, 1, 2, 2, 3, 3, 4, 12]
