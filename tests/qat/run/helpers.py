"""Shared settings for the training-run tests: the default recipe made tiny and quiet."""

from __future__ import annotations

from pathlib import Path

import torch

from qat.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RECIPE = ROOT / "recipes" / "digits_w4a4.yaml"

# 12 batches per epoch on digits with batch 128; warm-up, calibration and QAT all happen.
FAST = [
    "logging.wandb=disabled",
    "logging.progress_bar=false",
    "logging.telemetry_every_n_steps=5",
    "data.args.batch_size=128",
    "trainer.max_steps=30",
    "schedule.warmup_steps=10",
    "schedule.calibration_batches=2",
    "schedule.freeze_bn_step=null",
]


def fast_recipe(run_dir: Path, *overrides: str, path: Path = DEFAULT_RECIPE) -> Recipe:
    """The recipe at `path`, shrunk by FAST, writing under `run_dir`, plus `overrides`."""
    return load_recipe(path, [*FAST, f"logging.run_dir={run_dir}", *overrides])


def assert_same_state(expected: dict, actual: dict) -> None:
    """The same keys, tensors bit-identical, everything else equal (e.g. the quantizers' extra states)."""
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, actual[key]), key
        else:
            assert value == actual[key], key
