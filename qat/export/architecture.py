"""Rebuilding a model skeleton on the meta device from a checkpoint's `qat.architecture`.

Two forms are understood:

    {"_target_": "my_pkg.models.Net", **kwargs}   imports my_pkg.models, calls Net(**kwargs)
    {"hf_config": config.to_dict()}              transformers.AutoConfig.for_model(...), then the class
                                                 named in config.architectures[0] (needs `transformers`)

Trust: this imports a module named by the file. Only an `nn.Module` subclass is ever
called (never a function such as `subprocess.run`), and only modules already installed
can be imported; pass `qat.load(path, model=skeleton)` to import nothing at all.

Example:
    >>> skeleton = build_architecture({"_target_": "torchvision.models.resnet18", ...}, "model.safetensors")
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import torch
from torch import nn

from qat.export.format import ArchitectureError


def resolve_target(target: str, path: str = "") -> type[nn.Module]:
    """The nn.Module class named by 'pkg.module.Class' or 'pkg.module:Class'."""
    where = f"{path}: architecture target {target!r}"
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    parts = module_name.split(".") + attr.split(".")
    if not module_name or not attr or not all(part.isidentifier() for part in parts):
        raise ArchitectureError(f"{where} is not an import path like 'pkg.module.Class'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # any import-time failure of the named module
        raise ArchitectureError(f"{where} cannot be imported: {type(err).__name__}: {err}") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArchitectureError(f"{where} is not an nn.Module class; refusing to call it")
    return obj


def _construct(factory: Any, args: tuple, kwargs: dict, where: str) -> nn.Module:
    try:
        with torch.device("meta"):
            model = factory(*args, **kwargs)
    except Exception as err:  # the user's constructor may raise anything
        raise ArchitectureError(
            f"{where}: building the model on the meta device failed ({type(err).__name__}: {err}); "
            "build it yourself and pass qat.load(path, model=skeleton)"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{where}: the architecture built a {type(model).__name__}, not an nn.Module")
    return model


def build_target(architecture: dict, path: str) -> nn.Module:
    kwargs = {key: value for key, value in architecture.items() if key != "_target_"}
    target = architecture["_target_"]
    if not isinstance(target, str):
        raise ArchitectureError(f"{path}: architecture '_target_' must be a string")
    return _construct(resolve_target(target, path), (), kwargs, f"{path}: {target}")


def build_hf(hf_config: Any, path: str) -> nn.Module:
    """A Hugging Face model (random weights, meta device) from a config dict."""
    if not isinstance(hf_config, dict) or not isinstance(hf_config.get("model_type"), str):
        raise ArchitectureError(f"{path}: architecture 'hf_config' must be a config dict with a 'model_type'")
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise ArchitectureError(f"{path}: the architecture is a Hugging Face config; install transformers "
                                "(pip install 'qat[hf]') or pass qat.load(path, model=skeleton)") from None
    options = {key: value for key, value in hf_config.items() if key != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(hf_config["model_type"], **options)
    except Exception as err:  # transformers rejects unknown model types with various errors
        raise ArchitectureError(f"{path}: transformers cannot build the config: {err}") from None
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if isinstance(model_class, type) and issubclass(model_class, nn.Module):
        return _construct(model_class, (config,), {}, f"{path}: {names[0]}")
    return _construct(transformers.AutoModelForCausalLM.from_config, (config,), {}, f"{path}: AutoModelForCausalLM")


def build_architecture(architecture: Optional[dict], path: str) -> nn.Module:
    """The model skeleton (parameters on the meta device) that a checkpoint's tensors fill."""
    if architecture is None:
        raise ArchitectureError(f"{path}: the file records no architecture; pass qat.load(path, model=skeleton)")
    if "_target_" in architecture:
        return build_target(architecture, path)
    if "hf_config" in architecture:
        return build_hf(architecture["hf_config"], path)
    keys = sorted(architecture)
    raise ArchitectureError(f"{path}: architecture must hold '_target_' or 'hf_config', got keys {keys}")
