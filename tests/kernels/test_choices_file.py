"""Measured kernel choices are kept per machine on disk, so later processes choose (and compute) the same."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from qat.kernels import autotune, choices_file
from qat.kernels.weights import PackedInt4Weight

from tests.kernels.helpers import make_layer


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV_VAR, "1")
    autotune.clear_choices()
    yield
    autotune.clear_choices()


def rigged_run(fastest: str):
    """A `run` under which `fastest` measures fastest: every other candidate spins for a millisecond."""
    import time

    calls = []

    def run(name, x, weight):
        calls.append(name)
        if name != fastest:
            end = time.perf_counter() + 1e-3
            while time.perf_counter() < end:
                pass
        return x

    return run, calls


def test_the_first_measurement_is_stored_and_a_later_process_reads_it_without_measuring(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv(choices_file.ENV_VAR, str(path))
    weight = PackedInt4Weight(*make_layer(32, 64, 32), 32)
    x = torch.randn(4, 64)
    candidates = ["cpu_int4pack", "cpu_blocked_bf16"]
    run, calls = rigged_run("cpu_blocked_bf16")
    assert autotune.choose_by_measurement(x, weight, candidates, run) == "cpu_blocked_bf16"
    assert calls  # measured
    key = choices_file.key_text(autotune.choice_key(x, weight, candidates))
    assert json.loads(path.read_text()) == {key: "cpu_blocked_bf16"}
    autotune.clear_choices()  # a new process: nothing in memory
    run, calls = rigged_run("cpu_int4pack")  # a measurement now would pick the other one
    assert autotune.choose_by_measurement(x, weight, candidates, run) == "cpu_blocked_bf16"
    assert calls == []  # read, not measured


def test_with_the_file_off_every_process_measures(tmp_path, monkeypatch):
    monkeypatch.setenv(choices_file.ENV_VAR, "off")
    assert choices_file.choices_path() is None
    weight = PackedInt4Weight(*make_layer(32, 64, 32), 32)
    run, calls = rigged_run("cpu_int4pack")
    assert autotune.choose_by_measurement(torch.randn(2, 64), weight, ["cpu_int4pack", "cpu_small_m"], run) \
        == "cpu_int4pack"
    assert calls and not list(tmp_path.iterdir())


def test_a_corrupt_file_or_a_stored_name_that_cannot_run_is_measured_again(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv(choices_file.ENV_VAR, str(path))
    weight = PackedInt4Weight(*make_layer(32, 64, 32), 32)
    x, candidates = torch.randn(2, 64), ["cpu_int4pack", "cpu_small_m"]
    path.write_text("{not json")
    run, calls = rigged_run("cpu_small_m")
    assert autotune.choose_by_measurement(x, weight, candidates, run) == "cpu_small_m" and calls
    key = choices_file.key_text(autotune.choice_key(x, weight, candidates))
    path.write_text(json.dumps({key: "triton"}))  # not among this call's candidates
    autotune.clear_choices()
    run, calls = rigged_run("cpu_int4pack")
    assert autotune.choose_by_measurement(x, weight, candidates, run) == "cpu_int4pack" and calls


def test_an_unwritable_place_keeps_the_choice_in_this_process_only(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(choices_file.ENV_VAR, str(blocker / "choices.json"))  # its parent is a file
    weight = PackedInt4Weight(*make_layer(32, 64, 32), 32)
    run, _ = rigged_run("cpu_small_m")
    assert autotune.choose_by_measurement(torch.randn(2, 64), weight, ["cpu_int4pack", "cpu_small_m"], run) \
        == "cpu_small_m"


def test_the_default_file_is_per_machine_under_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(choices_file.ENV_VAR)
    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    assert choices_file.choices_path() == tmp_path / "kernel-choices" / f"{choices_file.machine_digest()}.json"
    assert choices_file.key_text((torch.bfloat16, 3, (1, 2))) == '["torch.bfloat16", 3, [1, 2]]'


SCRIPT = textwrap.dedent("""
    import sys, torch
    from qat.kernels.dispatch import int4_linear
    from tests.kernels.helpers import make_layer
    torch.set_num_threads(1)
    packed, scales, zeros = make_layer(256, 512, 128)
    outputs = [int4_linear(torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16),
                           packed, scales, zeros, 128) for rows in (1, 5, 24, 80)]
    torch.save(outputs, sys.argv[1])
""")


def test_two_processes_give_bit_identical_outputs_through_the_shared_file(tmp_path):
    env = {**__import__("os").environ, choices_file.ENV_VAR: str(tmp_path / "choices.json"),
           autotune.AUTOTUNE_ENV_VAR: "1"}
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}.pt"
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(torch.load(out))
    assert json.loads((tmp_path / "choices.json").read_text())  # the first process stored its choices
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
