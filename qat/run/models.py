"""One loader for models and teachers: a recipe's float model, its prepared form, a teacher from a
path, and a prepared model back from a training checkpoint.

Models come from an import path (`model._target_` + `args`) or from Hugging Face
(`model.hf`, see `qat.hf.load`). `qat.run.build` and the distillation teacher both load through
here, so there is one code path (and no import cycle between them).

Example:
    >>> model = load_float_model(recipe)                 # the pretrained / freshly built float model
    >>> model, report = build_model(recipe)              # ... prepared with recipe.quant
    >>> teacher = load_teacher("runs/x/version_0/checkpoints/last.ckpt", recipe)
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Optional

import safetensors.torch
import torch
from torch import nn

from qat.config import ConfigError
from qat.hf.load import hf_architecture, load_hf_model
from qat.lightning.pruning import pruned_layers
from qat.prune import attach_masks, remove_masks
from qat.recipe import HFSource, Recipe, TargetConfig, load_recipe_text
from qat.swap import PrepareReport, prepare

# Import paths that older qat versions wrote into saved recipes (run directories, checkpoints, exported
# files), by the module prefix they had then: they keep loading after the layout change.
MOVED_PATHS = {
    "qat.zoo": "qat.models",
    "qat.datasets": "qat.data",
    "qat.data_loading": "qat.data.loading",
}


def current_path(path: str) -> str:
    """`path` with a module prefix that moved (MOVED_PATHS) replaced by its current one."""
    for old, new in MOVED_PATHS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def import_object(path: str, key: str) -> Any:
    """The object at import path `pkg.module.Name` (or `pkg.module.Class.method`); `key` names the
    recipe field in errors."""
    path = current_path(path)
    parts = path.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ConfigError(f"{key}._target_={path!r} is not an import path like 'my_pkg.MyModel'")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise ConfigError(f"{key}._target_={path!r} cannot be imported: {err}") from None
            continue
        except ImportError as err:
            raise ConfigError(f"{key}._target_={path!r} cannot be imported: {err}") from None
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise ConfigError(f"{key}._target_={path!r} cannot be imported: {err}") from None
        return obj
    raise ConfigError(f"{key}._target_={path!r}: no module {parts[0]!r} can be imported; install its package "
                      "or add the folder holding it to PYTHONPATH")


def instantiate(target: TargetConfig, key: str, **extra: Any) -> Any:
    """Call the class or function at `target._target_` with `target.args` (and `extra`)."""
    factory = import_object(target._target_, key)
    try:
        return factory(**{**target.args, **extra})
    except TypeError as err:
        raise ConfigError(f"{key}: {target._target_}(**{dict(target.args)}) failed: {err}") from None


def load_float_model(recipe: Recipe) -> nn.Module:
    """The recipe's float model: pretrained from Hugging Face (`model.hf`) or built by import path."""
    spec = recipe.model
    if spec.hf is not None:
        model = load_hf_model(spec.hf)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model
    model = instantiate(TargetConfig(spec.target, spec.args), "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={spec.target!r} did not return an nn.Module")
    return model


def architecture_of(recipe: Recipe, model: nn.Module) -> dict:
    """How an int4 file rebuilds the recipe's model: its Hugging Face config (and source, for the
    tokenizer), or the import path and arguments."""
    if recipe.model.hf is not None:
        return hf_architecture(model, recipe.model.hf)
    return {"_target_": recipe.model.target, **recipe.model.args}


def build_model(recipe: Recipe, on_float: Optional[Callable[[nn.Module], None]] = None,
                ) -> tuple[nn.Module, PrepareReport]:
    """The recipe's float model, prepared with `recipe.quant` (and given all-ones pruning masks when
    `recipe.prune` is on); `on_float` sees the float model before prepare."""
    model = load_float_model(recipe)
    if on_float is not None:
        on_float(model)
    model, report = prepare(model, recipe.quant)
    if recipe.prune.enabled:
        attach_masks(model, pruned_layers(model, recipe.prune)[0])
    return model, report


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict, str]:
    """(prepared model with trained weights and qparams, architecture dict, recipe hash) from a
    Lightning checkpoint written by a qat run, or from a run directory (its checkpoints/last.ckpt).
    Pruning masks are baked into the weights and dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    info = checkpoint.get("qat")
    if not info or "recipe" not in info:
        raise ValueError(f"{path} is not a qat training checkpoint (no recipe inside)")
    recipe = load_recipe_text(info["recipe"])
    model, _ = build_model(recipe)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    remove_masks(model)  # pruned weights are already 0; the masks are training state
    return model.eval(), architecture_of(recipe, model), info.get("recipe_hash", "")


def load_teacher(source: str, recipe: Recipe) -> nn.Module:
    """The teacher at path `source`: a qat .ckpt (the model as that run ended, fake-quant state
    included), a .safetensors state dict of the recipe's model, or a Hugging Face model folder
    (`pkg:` paths too; loaded as the recipe's kind of model, or a causal LM).

    Loading draws nothing from the global RNGs, so the student's initialization is unchanged.
    """
    path = Path(source)
    with torch.random.fork_rng(devices=[]):
        if source.startswith("pkg:") or (path.is_dir() and (path / "config.json").is_file()):
            kind = recipe.model.hf.kind if recipe.model.hf is not None else "causal_lm"
            return load_hf_model(HFSource(path=source, kind=kind))
        if path.is_file() and path.suffix == ".ckpt":
            return model_from_checkpoint(path)[0]
        if path.is_file() and path.suffix == ".safetensors":
            model = load_float_model(recipe)
            model.load_state_dict(safetensors.torch.load_file(str(path)))
            return model
    raise FileNotFoundError(f"distill.teacher={source!r} is not 'initial', 'warmup', a .ckpt file, a .safetensors "
                            "state dict of the recipe's model, or a Hugging Face model directory (with config.json)")
