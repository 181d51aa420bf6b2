"""A tiny exported digits CNN with and without a calibration profile, and its synthetic input generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import qat
from qat.config import QuantizerConfig, QuantRule, QuantSpec
from qat.models import DigitsCNN
from qat.monitor.profile import write_profile

ARCHITECTURE = {"_target_": "qat.models.DigitsCNN", "channels": 4, "hidden": 16, "classes": 10}
SPEC = QuantSpec(weight=QuantizerConfig(bits=4, granularity="channel", init="minmax"),
                 activation=QuantizerConfig(bits=4, symmetric=False, quantizer="lsq_plus", granularity="tensor",
                                            init="minmax"),
                 rules=[QuantRule(type="Conv2d", granularity="channel")])


def digits_like(samples: int, generator: torch.Generator) -> Tensor:
    """(samples, 1, 8, 8) synthetic images: a per-sample random stroke pattern plus noise, one distribution."""
    base = torch.rand(samples, 1, 8, 8, generator=generator)
    return (base > 0.6).float() * 2 - 1 + 0.2 * torch.randn(samples, 1, 8, 8, generator=generator)


def clean_batches() -> list[Tensor]:
    """The 1,024 clean samples the file's profile is taken on."""
    return list(digits_like(1024, torch.Generator().manual_seed(2)).split(256))


def prepared_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = qat.prepare(DigitsCNN(channels=4, hidden=16), SPEC)
    qat.calibrate(model, [digits_like(256, torch.Generator().manual_seed(1))])
    return model.eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{'model': the prepared model, 'with': file with a profile, 'without': an old-style file without one,
    'profile': the profile written}."""
    folder = tmp_path_factory.mktemp("monitor")
    model = prepared_model()
    with_profile, without = folder / "with.safetensors", folder / "without.safetensors"
    qat.export_model(model, with_profile, architecture=ARCHITECTURE)
    qat.export_model(model, without, architecture=ARCHITECTURE)
    profile = write_profile(with_profile, clean_batches())
    return {"model": model, "with": Path(with_profile), "without": Path(without), "profile": profile}
