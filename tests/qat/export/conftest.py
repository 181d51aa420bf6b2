"""Shared helpers for the export tests: models with trained-looking qparams, bitwise comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import qat

sys.path.insert(0, str(Path(__file__).parent))  # export_test_models, importable by `_target_`

def assert_bitwise_equal(actual: Tensor, expected: Tensor) -> None:
    """Same dtype and shape, no NaN, and every value identical bit for bit (the sign of zero included)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not (actual.isnan().any() or expected.isnan().any())
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    mismatched = (actual.contiguous().view(as_int) != expected.contiguous().view(as_int)).sum().item()
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
