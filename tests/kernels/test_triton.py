"""Runs the Triton kernel cases (triton_cases.py) in subprocesses: interpreted on CPU, compiled on CUDA.

TRITON_INTERPRET must be set before triton is first imported, and this pytest process may
already have imported it, hence the subprocess. The cases report their own failures; this
test shows the tail of that report.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("triton_cases.py")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run_cases(interpret: bool) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "QAT_KERNEL_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES.relative_to(ROOT))]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@needs_triton
def test_triton_kernels_in_the_interpreter():
    _run_cases(interpret=True)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernels_on_gpu():
    _run_cases(interpret=False)
