"""Recipes: every shipped file loads and runs; bad keys and values fail before any work."""

from __future__ import annotations

import json

import pytest

from qat.config import ConfigError
from qat.recipe import Recipe, load_recipe, load_recipe_text, recipe_hash, recipe_to_yaml
from qat.run.train import train
from tests.qat.run.helpers import FAST, ROOT, fast_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# Recipes of the pretrained Hugging Face models run (a few steps, export, load) in tests/qat/hf/test_real_models.py.
HF_RECIPES = [p for p in RECIPES if load_recipe(p).model.hf is not None]
# The pretrained EfficientNet-Lite0 recipe runs (a few steps, export, load, ONNX) in test_effnet_recipe.py.
REAL_RECIPES = [*HF_RECIPES, ROOT / "recipes" / "effnet_lite0_fmnist_w4a8.yaml"]
TOY_RECIPES = [p for p in RECIPES if p not in REAL_RECIPES]


def test_recipes_directory_is_not_empty():
    assert RECIPES, "recipes/ must ship at least the default recipe"


def test_every_recipe_loads_and_validates():
    assert {p.stem for p in HF_RECIPES} == {"smollm2_w4_kd", "minilm_w4_kd"}
    for path in RECIPES:
        assert isinstance(load_recipe(path), Recipe)


def test_the_full_digits_runs_train_on_one_torch_thread():
    """Two threads per tiny op are 3-5x slower for the digits CNN on a busy 2-core machine
    (benchmarks/training/default-run-time.md). digits_w4a4, the tests' base recipe, keeps torch's
    default (test_cpu_threads_sets_torchs_intra_op_threads_for_the_run relies on it)."""
    threads = {name: load_recipe(ROOT / "recipes" / f"{name}.yaml").trainer.cpu_threads
               for name in ("digits_w2a4", "digits_w4a4_kd24")}
    assert threads == {"digits_w2a4": 1, "digits_w4a4_kd24": 1}


@pytest.mark.parametrize("path", TOY_RECIPES, ids=[p.stem for p in TOY_RECIPES])
def test_every_toy_recipe_runs_a_few_steps(path, tmp_path):
    recipe = load_recipe(path, [*FAST, f"logging.run_dir={tmp_path}", "trainer.max_steps=4",
                                "schedule.warmup_steps=2", "export.enabled=false"])
    assert isinstance(recipe, Recipe)
    summary = train(recipe, quiet=True)
    assert summary["steps"] == 4
    assert summary["qat"]["loss"] == pytest.approx(summary["qat"]["loss"])  # finite: NaN != NaN


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lrr=0.1", ["optimizer.lrr", "did you mean 'lr'", "weight_decay"]),
        ("modell._target_=x", ["'modell'", "did you mean 'model'", "optimizer"]),
        ("quant.weight.bitz=4", ["bitz", "did you mean 'bits'", "group_size"]),
    ],
)
def test_unknown_key_names_the_key_the_valid_keys_and_the_closest_match(override, expected):
    with pytest.raises(ConfigError) as info:
        load_recipe(None, [override])
    for text in expected:
        assert text in str(info.value)


def test_unknown_key_in_a_yaml_file_fails_the_same_way(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"trainer.max_epoch.*did you mean 'max_epochs'"):
        load_recipe(path)


def test_unknown_key_inside_a_rule_names_the_rule_fields():
    with pytest.raises(ConfigError, match=r"QuantRule.skipp.*did you mean 'skip'"):
        load_recipe(None, ["quant.rules=[{name: lm_head, skipp: true}]"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("trainer.max_epochs=many", r"trainer.max_epochs"),
        ("task=segmentation", r"task='segmentation'.*'classification'"),
        ("logging.wandb=sometimes", r"logging.wandb.*'offline'"),
        ("quant.weight.bits=9", r"bits=9.*2..8"),
        ("quant.weight.granularity=row", r"granularity='row'.*'tensor', 'channel', 'group'"),
        ("optimizer.lr=-1", r"optimizer.lr=-1"),
        ("trainer.cpu_threads=0", r"trainer.cpu_threads=0 must be >= 1"),
        ("no_equals_sign", r"key=value"),
    ],
)
def test_wrong_types_and_values_fail_naming_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_recipe(None, [override])


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_win_over_the_file_and_the_yaml_round_trips():
    recipe = load_recipe(ROOT / "recipes" / "digits_w4a4.yaml", ["optimizer.lr=0.5", "quant.weight.bits=3"])
    assert recipe.optimizer.lr == 0.5 and recipe.quant.weight.bits == 3
    again = load_recipe_text(recipe_to_yaml(recipe))
    assert again == recipe and recipe_hash(again) == recipe_hash(recipe)


USER_RECIPE = """
name: user_run
model:
  _target_: tests.qat.run.user_plugin.UserMLP
  args: {hidden: 48}
data:
  _target_: tests.qat.run.user_plugin.UserDigits
  args: {batch_size: 64}
quant:
  weight: {bits: 4, granularity: channel}
"""


def test_user_model_and_data_module_plug_in_by_import_path(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_text(USER_RECIPE)
    recipe = fast_recipe(tmp_path, "trainer.max_steps=12", "data.args.batch_size=64", path=path)
    summary = train(recipe, quiet=True)
    assert summary["quantized_layers"] == 2
    saved = json.loads((tmp_path / "user_run" / "version_0" / "summary.json").read_text())
    assert saved["qat"]["acc"] == summary["qat"]["acc"]


def test_bad_import_path_is_a_config_error(tmp_path):
    recipe = fast_recipe(tmp_path, "model._target_=tests.nowhere.Model")
    with pytest.raises(ConfigError, match=r"model._target_='tests.nowhere.Model' cannot be imported"):
        train(recipe, quiet=True)


def test_bad_model_arguments_are_a_config_error(tmp_path):
    recipe = fast_recipe(tmp_path, "model.args={wings: 2}")
    with pytest.raises(ConfigError, match=r"model: qat.models.DigitsCNN.*wings"):
        train(recipe, quiet=True)
