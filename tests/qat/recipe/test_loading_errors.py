"""Recipe files and overrides that cannot be read: one ConfigError naming the file (line, column) or the
override, never a yaml or omegaconf traceback."""

from __future__ import annotations

import pytest

from qat.config import ConfigError
from qat.recipe import load_recipe


@pytest.mark.parametrize(("text", "message"), [
    ("quant:\n  weight: {bits: 4\n", "line 3, column 1: expected ',' or '}', but got '<stream end>' "
                                     "(while parsing a flow mapping that starts at line 2, column 11)"),
    ("quant:\n\tweight: {bits: 4}\n", "line 2, column 1: a tab character; YAML indents with spaces only"),
    ("name: a\nname: b\n", "line 2, column 1: found duplicate key name"),
])
def test_a_yaml_error_names_the_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"recipe file {path}, ") and message in str(err.value)


@pytest.mark.parametrize(("text", "kind"), [
    ("- model\n- data\n", "a list"),
    ("hello\n", "a single value ('hello')"),
    ("42\n", "a single value ('42')"),
])
def test_a_top_level_that_is_no_mapping_says_what_a_recipe_is(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="a recipe is a mapping of sections") as err:
        load_recipe(path)
    assert f"recipe file {path}: the top level is {kind}" in str(err.value)


def test_an_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_recipe(path).name == load_recipe().name


@pytest.mark.parametrize(("override", "message"), [
    ("quant.rules=[{name: x", "override 'quant.rules=[{name: x': its value is not valid YAML: did not find "
                              "expected ',' or '}' (while parsing a flow mapping)"),
    ("name='open", "override \"name='open\": its value is not valid YAML: found unexpected end of stream"),
    ("name=${oops", "override 'name=${oops': "),
])
def test_a_malformed_override_is_named_with_the_parse_problem(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["trainer.max_steps=3", override])
    assert message in str(err.value)


def test_overrides_read_one_by_one_still_build_on_each_other():
    recipe = load_recipe(None, ["quant.rules=[{name: a}]", "quant.rules.0.skip=true"])
    assert recipe.quant.rules[0].name == "a" and recipe.quant.rules[0].skip


@pytest.mark.parametrize("word", ["optimizer.lr", "trainer.max_epochs"])
def test_an_override_without_equals_in_the_file_position_says_so(word, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_recipe(word)
    assert str(err.value) == (f"'{word}' is no file and looks like an override without '=': write {word}=VALUE "
                              "(a recipe file name ends in .yaml or .yml)")


@pytest.mark.parametrize("path", ["missing.yaml", "missing.yml", "configs/missing", "recipe"])
def test_a_missing_recipe_file_is_still_file_not_found(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"recipe file not found: {path}"):
        load_recipe(path)
