"""examples/own_model (README "Your own model") end to end: its recipe trains through `qat train` with the
folder importable, writes the summary, and its int4 file loads back as the example's own class."""

from __future__ import annotations

import json

import pytest
import torch

import qat
from qat.cli import main
from tests.qat.run.helpers import ROOT

EXAMPLE = ROOT / "examples" / "own_model"


@pytest.mark.slow
def test_the_own_model_example_trains_exports_and_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLE))  # what PYTHONPATH=examples/own_model does for the command
    argv = ["train", str(EXAMPLE / "recipe.yaml"), f"logging.run_dir={tmp_path}", "trainer.max_epochs=2",
            "schedule.warmup_steps=30", "schedule.calibration_batches=2"]
    assert main(argv) == 0, capsys.readouterr().err
    run_dir = tmp_path / "own_model_blobs" / "version_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quantized_layers"] == 3 and summary["steps"] == 50
    assert summary["fp"]["acc"] > 0.5 and summary["int4"]["acc"] > 0.5  # 4 classes: chance is 0.25
    model = qat.load(run_dir / "model.safetensors")
    assert type(model).__name__ == "BlobMLP"
    with torch.no_grad():
        assert model(torch.randn(3, 16)).shape == (3, 4)
