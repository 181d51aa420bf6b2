"""Shared helpers for the export tests: models with trained-looking qparams, bitwise comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import qat

sys.path.insert(0, str(Path(__file__).parent))  # export_test_models, importable by `_target_`

INT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(actual: Tensor, expected: Tensor) -> None:
    """Same dtype, shape and bits (so -0.0 != 0.0 and NaN payloads count)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    view = INT_VIEWS[actual.dtype]
    mismatched = (actual.contiguous().view(view) != expected.contiguous().view(view)).sum().item()
    assert mismatched == 0, f"{mismatched} of {actual.numel()} values differ"


@torch.no_grad()
def perturb_qparams(model: nn.Module, generator: torch.Generator) -> None:
    """Give every quantizer non-trivial 'trained' qparams: scales moved by up to +-40 %, and for
    lsq_plus zero points moved by non-integer amounts (rounded by effective_qparams)."""
    for _, quantizer in qat.quantizers(model):
        factor = 1 + 0.8 * (torch.rand(quantizer.scale.shape, generator=generator) - 0.5)
        quantizer.scale.mul_(factor)
        if quantizer.config.quantizer == "lsq_plus":
            quantizer.zero_point.add_(6 * (torch.rand(quantizer.zero_point.shape, generator=generator) - 0.5))


def make_prepared(model: nn.Module, spec: qat.QuantSpec, seed: int, calibrate_with: Tensor | None = None) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model, _ = qat.prepare(model, spec)
    if calibrate_with is not None:
        qat.calibrate(model, [calibrate_with])
    perturb_qparams(model, generator)
    return model.eval()


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactness is promised on the reference path; faster backends have their own tolerances."""
    monkeypatch.setenv("QAT_KERNEL_BACKEND", "reference")


@pytest.fixture
def checkpoint_path(tmp_path: Path) -> Path:
    return tmp_path / "model.safetensors"
