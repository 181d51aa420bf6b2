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

from omegaconf import OmegaConf
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

    Raises `ConfigError` for unknown keys, wrong types and invalid values, and
    `FileNotFoundError` for a missing file.
    """
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        layers.append(OmegaConf.load(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    return typed_recipe(layers)


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
