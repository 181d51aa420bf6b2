"""Faults of a 2-process DDP run (CPU, gloo) on TinyLM: a NaN loss on one rank (under FSDP2 too), a rank
killed, a rank hung.

Each run is a subprocess (tests/qat/run/dist_script.py) with one thread per process and 12 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.qat.run.helpers import ROOT, assert_same_state

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")]


def run_dist(run_dir: Path, *args: str, timeout: int = 400, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "tests.qat.run.dist_script", str(run_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_no_rank_left(run_dir: Path) -> None:
    """Every rank's process has exited (a zombie awaiting its reaper counts as exited)."""
    for pid_file in run_dir.glob("pid_rank*"):
        status = Path(f"/proc/{pid_file.read_text()}/status")
        for _ in range(50):  # SIGKILL is delivered asynchronously: give the kernel a moment
            if not status.exists() or "\tZ" in status.read_text().split("State:")[1][:4]:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"{pid_file.name} ({pid_file.read_text()}) is still running")


@pytest.fixture(scope="module")
def uninterrupted(tinylm_runs):
    return torch.load(tinylm_runs["ddp"] / "final_state.pt", weights_only=True)


def test_killed_rank_fails_the_job_and_resume_ends_bit_identical(tmp_path, uninterrupted):
    killed = run_dist(tmp_path, "kill", "7")
    assert killed.returncode != 0  # rank 0 notices the dead peer (gloo: connection reset) and fails
    assert "Connection reset by peer" in killed.stderr or "Connection closed by peer" in killed.stderr
    assert_no_rank_left(tmp_path)
    checkpoint = tmp_path / "tinylm_w4" / "version_0" / "checkpoints" / "last.ckpt"
    mid_run = torch.load(checkpoint, weights_only=True)
    assert mid_run["global_step"] in (6, 7)  # a mid-run checkpoint (rank 0 may have saved step 7's)
    resumed = run_dist(tmp_path, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(uninterrupted, torch.load(tmp_path / "final_state.pt", weights_only=True))
    for key in ("qkv.weight", "lm_head.weight"):  # the resumed run trained on from the mid-run state
        assert not torch.equal(uninterrupted[key], mid_run["state_dict"][f"model.{key}"]), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_nan_loss_on_one_rank_stops_every_rank_with_one_diagnostic_checkpoint(tmp_path, strategy):
    done = run_dist(tmp_path, "nan", "6", f"trainer.strategy={strategy}")
    assert done.returncode != 0
    diagnostic = tmp_path / "tinylm_w4" / "version_0" / "checkpoints" / "nonfinite-step6.ckpt"
    for rank, value in ((0, "non-finite"), (1, "nan")):
        assert (f"[rank{rank}]: qat.lightning.nonfinite.NonFiniteLossError: loss became {value} on rank(s) [1] "
                f"at step 6") in done.stderr
    assert done.stderr.count(f"Diagnostic checkpoint: {diagnostic}.") == 2  # both ranks name the same file
    assert torch.load(diagnostic, weights_only=True)["global_step"] == 6
    assert not (tmp_path / "tinylm_w4" / "version_1").exists()  # rank 1 joined rank 0's run directory
    assert_no_rank_left(tmp_path)


def test_hung_rank_times_out_and_no_process_is_left(tmp_path):
    done = run_dist(tmp_path, "hang", "5", QAT_DIST_TIMEOUT_S="30")  # 30 s: rank 1 must start up within it too
    assert done.returncode != 0
    assert "Timed out waiting 30000ms" in done.stderr
    assert_no_rank_left(tmp_path)  # the sleeping rank was killed by rank 0 on its way out
