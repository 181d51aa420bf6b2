"""Models and data modules by import path: the old-path alias map and the errors a user meets."""

from __future__ import annotations

import pytest

from qat.config import ConfigError
from qat.data import DigitsDataModule, SyntheticTokensDataModule
from qat.data.loading import ResumableLoader
from qat.models import DigitsCNN, TinyLM
from qat.recipe import load_recipe_text
from qat.run.models import current_path, import_object, load_float_model


@pytest.mark.parametrize(("old", "new", "obj"), [
    ("qat.zoo.DigitsCNN", "qat.models.DigitsCNN", DigitsCNN),
    ("qat.zoo.TinyLM", "qat.models.TinyLM", TinyLM),
    ("qat.datasets.DigitsDataModule", "qat.data.DigitsDataModule", DigitsDataModule),
    ("qat.datasets.SyntheticTokensDataModule", "qat.data.SyntheticTokensDataModule", SyntheticTokensDataModule),
    ("qat.data_loading.ResumableLoader", "qat.data.loading.ResumableLoader", ResumableLoader),
])
def test_paths_that_older_runs_saved_still_import(old, new, obj):
    assert current_path(old) == new
    assert import_object(old, "model") is obj


def test_a_saved_recipe_naming_the_old_model_path_builds_the_model():
    recipe = load_recipe_text("model: {_target_: qat.zoo.DigitsCNN, args: {classes: 3}}\n")
    model = load_float_model(recipe)
    assert isinstance(model, DigitsCNN) and model.classifier[-1].out_features == 3


def test_only_whole_module_names_are_mapped():
    assert current_path("qat.zookeeper.Model") == "qat.zookeeper.Model"
    assert current_path("my_pkg.zoo.Net") == "my_pkg.zoo.Net"


@pytest.mark.parametrize(("path", "message"), [
    ("DigitsCNN", "is not an import path like 'my_pkg.MyModel'"),
    ("my_pkg..Net", "is not an import path like 'my_pkg.MyModel'"),
    ("no_such_package_here.Net", "no module 'no_such_package_here' can be imported; install its package or add "
                                 "the folder holding it to PYTHONPATH"),
    ("qat.models.NoSuchModel", "cannot be imported: module 'qat.models' has no attribute 'NoSuchModel'"),
])
def test_a_path_that_does_not_import_says_why(path, message):
    with pytest.raises(ConfigError) as err:
        import_object(path, "model")
    assert message in str(err.value) and f"model._target_={path!r}" in str(err.value)
