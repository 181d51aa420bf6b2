"""Errors a user meets at the command line: one line on stderr naming the problem, a non-zero exit code,
no traceback, and nothing written under the run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qat
from qat.cli import main
from qat.data.digits import DigitsDataModule
from qat.models import DigitsCNN
from tests.qat.run.helpers import DEFAULT_RECIPE, FAST


class ThreeClassDigits(DigitsDataModule):
    """A data module that says it has 3 classes (its labels still go to 9)."""

    num_classes = 3


def fails_in_one_line(capsys, runs: Path, argv: list[str], code: int = 2) -> str:
    """The one line `qat ARGV` prints to stderr, after checking the exit code and that no run was written."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not runs.exists() or list(runs.iterdir()) == []
    return err.strip()


@pytest.fixture
def runs(tmp_path):
    return tmp_path / "runs"


def train(runs: Path, *args: str) -> list[str]:
    return ["train", *args, *FAST, f"logging.run_dir={runs}"]


def test_a_yaml_syntax_error(tmp_path, runs, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("quant:\n  weight: {bits: 4\n")
    line = fails_in_one_line(capsys, runs, train(runs, str(path)))
    assert line.startswith(f"qat: error: recipe file {path}, line 3, column 1: ")


def test_a_tab_in_a_recipe(tmp_path, runs, capsys):
    path = tmp_path / "tab.yaml"
    path.write_text("trainer:\n\tmax_steps: 3\n")
    line = fails_in_one_line(capsys, runs, train(runs, str(path)))
    assert line == f"qat: error: recipe file {path}, line 2, column 1: a tab character; YAML indents with spaces only"


def test_a_recipe_that_is_a_list(tmp_path, runs, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- trainer\n- model\n")
    line = fails_in_one_line(capsys, runs, train(runs, str(path)))
    assert "the top level is a list, but a recipe is a mapping of sections" in line


def test_a_malformed_override(runs, capsys):
    line = fails_in_one_line(capsys, runs, train(runs, str(DEFAULT_RECIPE), "quant.rules=[{name: x"))
    assert "override 'quant.rules=[{name: x': its value is not valid YAML" in line


def test_an_override_without_equals(tmp_path, runs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `python train.py optimizer.lr`, where no file of that name exists
    line = fails_in_one_line(capsys, runs, ["train", "optimizer.lr"])
    assert "'optimizer.lr' is no file and looks like an override without '='" in line
    assert not (tmp_path / "runs").exists()


def test_generate_on_a_model_that_is_no_language_model(tmp_path, runs, capsys):
    model, _ = qat.prepare(DigitsCNN(), qat.QuantSpec())
    qat.calibrate(model, [torch.rand(4, 1, 8, 8)])
    path = tmp_path / "model.safetensors"  # what the default digits run exports
    qat.export_model(model.eval(), path, architecture={"_target_": "qat.models.DigitsCNN"})
    line = fails_in_one_line(capsys, runs, ["generate", str(path), "hello"], code=1)
    assert f"{path} holds a DigitsCNN model, not a language model" in line


def test_a_model_whose_outputs_are_not_the_data_modules_classes(runs, capsys):
    line = fails_in_one_line(capsys, runs, train(runs, str(DEFAULT_RECIPE), "model.args.classes=3"))
    assert ("the model's output width is not the class count: DigitsCNN gives 3 outputs per sample (logits "
            "[256, 3] for one validation batch), the task scores 10 classes (num_classes of the data module "
            "DigitsDataModule)") in line


def test_a_data_module_whose_classes_are_not_the_models_outputs(runs, capsys):
    data = f"data._target_={__name__}.ThreeClassDigits"
    line = fails_in_one_line(capsys, runs, train(runs, str(DEFAULT_RECIPE), data))
    assert "DigitsCNN gives 10 outputs per sample" in line
    assert "the task scores 3 classes (num_classes of the data module ThreeClassDigits)" in line


def test_labels_beyond_the_recipes_class_count(runs, capsys):
    data = f"data._target_={__name__}.ThreeClassDigits"
    line = fails_in_one_line(capsys, runs, train(runs, str(DEFAULT_RECIPE), data, "model.args.classes=3"))
    assert ("the data does not fit the classes: labels range 0..9, the task scores 3 classes (num_classes of "
            "the data module ThreeClassDigits)") in line


def test_a_failure_after_the_run_directory_was_made_removes_it(tmp_path, runs, capsys):
    """The teacher file is looked for after the directory exists; what this run made goes again."""
    teacher = tmp_path / "no_teacher.ckpt"
    line = fails_in_one_line(capsys, runs, train(runs, str(DEFAULT_RECIPE), "distill.enabled=true",
                                                 f"distill.teacher={teacher}"))
    assert f"distill.teacher='{teacher}'" in line
    assert not runs.exists()


def test_a_failed_build_keeps_the_runs_already_there(tmp_path, runs, capsys):
    (runs / "digits_w4a4" / "version_0").mkdir(parents=True)
    teacher = tmp_path / "no_teacher.ckpt"
    assert main(train(runs, str(DEFAULT_RECIPE), "distill.enabled=true", f"distill.teacher={teacher}")) == 2
    assert [p.name for p in (runs / "digits_w4a4").iterdir()] == ["version_0"]
