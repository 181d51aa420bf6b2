"""Reading recipes: YAML files and command-line overrides merged over the schema, checked, typed.

`load_recipe` merges a YAML file over the schema's defaults and the command-line overrides,
refuses unknown keys and wrong types before any work (naming the key, the valid keys and the
closest match), and returns typed dataclasses (`qat.recipe.schema`). `qat.run.build` is the
only reader of the result.

Example:
    >>> recipe = load_recipe("recipes/digits_w4a4.yaml", ["optimizer.lr=3e-3", "trainer.max_epochs=5"])
    >>> recipe.quant.weight.bits
    4
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from qat.config import ConfigError, QuantSpec
from qat.recipe.schema import Recipe


def _unknown_key_error(err: ConfigKeyError) -> ConfigError:
    full_key = str(getattr(err, "full_key", "") or "")
    key = str(getattr(err, "key", "") or full_key.rpartition(".")[2])
    owner = getattr(err, "object_type", None)
    valid = [f.name for f in fields(owner)] if owner is not None and is_dataclass(owner) else []
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = full_key if "." in full_key or owner in (None, Recipe) else f"{owner.__name__}.{key}"
    return ConfigError(f"unknown recipe key '{where}'{hint}; valid keys here: {', '.join(valid)}")


def load_recipe(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> Recipe:
    """The typed recipe from a YAML file (or the schema defaults) plus `key=value` overrides.

    Raises `ConfigError` for unknown keys, wrong types and invalid values, YAML errors (file, line and
    column), a file whose top level is no mapping, a malformed override and an override without '='
    given as the file; `FileNotFoundError` for a missing file.
    """
    layers = []
    if path is not None:
        if not Path(path).is_file():
            if looks_like_override(str(path)):
                raise ConfigError(f"{str(path)!r} is no file and looks like an override without '=': write "
                                  f"{path}=VALUE (a recipe file name ends in .yaml or .yml)")
            raise FileNotFoundError(f"recipe file not found: {path}")
        layers.append(read_recipe_file(path))
    layers.append(parse_overrides(overrides or []))
    return typed_recipe(layers)


def looks_like_override(word: str) -> bool:
    """`optimizer.lr` given where a recipe file goes: dotted identifiers, no .yaml/.yml ending, no file."""
    parts = word.split(".")
    return (len(parts) > 1 and all(part.isidentifier() for part in parts)
            and not word.endswith((".yaml", ".yml")) and not Path(word).exists())


def yaml_problem(err: yaml.YAMLError, with_position: bool = True) -> str:
    """A YAML error in one line: line and column (1-based) and what the parser found, and where the
    construct it was reading began (a bracket left open shows up where the file ends)."""
    problem = str(getattr(err, "problem", None) or str(err).splitlines()[0])
    mark, context, context_mark = (getattr(err, name, None) for name in ("problem_mark", "context", "context_mark"))
    if "'\\t'" in problem:
        problem, context = "a tab character; YAML indents with spaces only", None
    if context and context_mark is not None and with_position:
        problem += f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        problem += f" ({context})"
    if mark is None or not with_position:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_recipe_file(path: str | Path) -> DictConfig:
    """A recipe file's sections. A YAML error names the file, line and column; a top level that is a list
    or a single value is refused here (omegaconf would say 'Cannot merge incompatible container types',
    or read a lone word as a key)."""
    try:
        top = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)  # the shape alone
        if top is not None and not isinstance(top, yaml.MappingNode):
            kind = "a list" if isinstance(top, yaml.SequenceNode) else f"a single value ({top.value!r})"
            raise ConfigError(f"recipe file {path}: the top level is {kind}, but a recipe is a mapping of "
                              "sections (model:, data:, quant:, ...)")
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe file {path}, {yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe file {path} is not UTF-8 text: {err}") from None


def parse_overrides(overrides: List[str]) -> DictConfig:
    """`key=value` overrides as one config, read one by one so that an error names the override."""
    config = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            config.merge_with_dotlist([item])
        except yaml.YAMLError as err:  # the value is read as YAML: a bracket or quote left open
            raise ConfigError(f"override {item!r}: its value is not valid YAML: "
                              f"{yaml_problem(err, with_position=False)}") from None
        except OmegaConfBaseException as err:  # e.g. an interpolation `${...}` left open
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from None
    return config


def typed_recipe(layers: list) -> Recipe:
    """Merge `layers` over the schema and convert to dataclasses, turning omegaconf errors into ConfigError."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), *layers))
    except ConfigKeyError as err:
        raise _unknown_key_error(err) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"invalid recipe value at '{key}': {msg}" if key else f"invalid recipe: {msg}") from None


def load_recipe_text(text: str) -> Recipe:
    """A recipe from YAML text (e.g. the copy stored in a checkpoint), with the same checks."""
    return typed_recipe([OmegaConf.create(text)])


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (saved in every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def _short_hash(config: Any) -> str:
    data = OmegaConf.to_container(OmegaConf.structured(config))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def recipe_hash(recipe: Recipe) -> str:
    """A short SHA-256 of the resolved recipe, stored in checkpoints and exports."""
    return _short_hash(recipe)


def quant_spec_hash(spec: QuantSpec) -> str:
    """SHA-256 of the quantization spec alone: resuming with another spec is refused."""
    return _short_hash(spec)
