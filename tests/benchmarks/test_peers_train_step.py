"""The training-cost comparison (benchmarks/peers/train_step.py) on a tiny local Llama: each mode trains the model
it claims to (float, qat's fake-quant layers, torchao's FakeQuantizedLinear), a step moves the weights, and the
table puts failures in their own row."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import qat
from benchmarks.peers import train_step
from qat.recipe import load_recipe
from qat.recipe.loading import recipe_to_yaml
from tests.qat.hf.test_train_hf import LLAMA
from tests.qat.hf.tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_step")
    folder = save_tiny_llama(root / "llama", intermediate_size=128)  # every Linear takes groups of 64
    path = root / "recipe.yaml"
    recipe = load_recipe(None, [*LLAMA, f"model.hf.path={folder}", "schedule.freeze_step=0"])  # as SmolLM2's
    path.write_text(recipe_to_yaml(recipe))
    return path


def test_each_mode_prepares_the_layers_it_names(tiny_recipe) -> None:
    recipe = load_recipe(tiny_recipe)
    model, _ = train_step.prepared("float", recipe)
    assert not any(isinstance(m, qat.QuantLinear) for m in model.modules())
    model, what = train_step.prepared("qat", recipe)
    assert sum(isinstance(m, qat.QuantLinear) for m in model.modules()) == 15  # 7 projections x 2 layers, the head
    assert what.startswith("qat prepare: int4 g64 asym")
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed: its mode is not checked")
    from torchao.quantization.qat import FakeQuantizedLinear

    model, what = train_step.prepared("torchao", recipe)
    assert sum(isinstance(m, FakeQuantizedLinear) for m in model.modules()) == 15  # the projections and lm_head
    assert "QATConfig(Int4WeightOnlyConfig(group_size=64)" in what


def test_a_child_times_steps_that_train(tiny_recipe, monkeypatch) -> None:
    seen = {}
    real = train_step.timed_steps

    def spy(model, inputs, steps, teacher=None, cpu_times=None):
        before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        times = real(model, inputs, steps, teacher, cpu_times)
        seen["moved"] = not torch.equal(before, model.model.layers[0].mlp.down_proj.weight.detach())
        return times

    monkeypatch.setattr(train_step, "timed_steps", spy)
    result = train_step.child(str(tiny_recipe), "qat", batch=2, seq=8, steps=2, threads=1)
    assert seen["moved"] and len(result["steps_s"]) == 2 and len(result["steps_cpu_s"]) == 2
    assert result["step_s"] > 0 and result["cpu_s"] > 0 and result["peak_rss_mib"] > 0
    assert result["trainable"] == sum(p.numel() for p in train_step.prepared("float", load_recipe(tiny_recipe))[0]
                                      .parameters())  # the weights train, the frozen scales do not (tied once)


def test_table_ratios_and_a_failed_mode() -> None:
    def run(cpu, wall, mib):
        return {"cpu_s": cpu, "step_s": wall, "peak_rss_mib": mib}
    text = train_step.table({"float": [run(10, 20, 5000), run(12, 40, 5200)], "qat": [run(13.2, 30, 6000)],
                             "torchao": [{"mode": "torchao", "error": "ImportError: no torchao"}]})
    assert "| float | 11.00 | 1.00x | 0.83x | 30.00 | 1.00x | 1.00x | 5100 | 1.00x | 0.85x |" in text
    assert "| qat | 13.20 | 1.20x | 1.00x | 30.00 | 1.00x | 1.00x | 6000 | 1.18x | 1.00x |" in text
    assert "| torchao | failed: ImportError: no torchao |" in text
