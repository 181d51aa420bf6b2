"""Recipes: one typed schema (omegaconf structured configs) for a whole training run.

A recipe is YAML holding names and numbers; `load_recipe` merges it over the schema's
defaults and the command-line overrides, refuses unknown keys and wrong types before
any work (naming the key, the valid keys and the closest match), and returns typed
dataclasses. `qat.build` is the only reader of the result.

Example:
    >>> recipe = load_recipe("recipes/digits_w4a4.yaml", ["optimizer.lr=3e-3", "trainer.max_epochs=5"])
    >>> recipe.quant.weight.bits
    4
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from qat.config import ConfigError, QuantSpec

TASKS = ("classification", "language_model")
WANDB_MODES = ("offline", "online", "disabled")
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TargetConfig:
    """An object built by import path: `_target_` plus keyword arguments `args`."""

    _target_: str = "???"
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """When quantization happens, in optimizer steps.

    FP warm-up runs `warmup_steps` steps with fake-quant off; then `calibration_batches`
    training batches initialize observers and scales, and fake-quant goes on (weights,
    and activations from `activation_start_step` if later). Scales and observers freeze
    at `freeze_step`, BatchNorm statistics at `freeze_bn_step` (None: never).
    """

    warmup_steps: int = 0
    calibration_batches: int = 8
    activation_start_step: Optional[int] = None
    freeze_step: Optional[int] = None
    freeze_bn_step: Optional[int] = None


@dataclass
class OptimizerConfig:
    """Optimizer for the model; quantizer scales get their own group (own lr, no weight decay)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    quantizer_lr: Optional[float] = None
    schedule: str = "cosine"


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets (see README for DDP / FSDP on N GPUs)."""

    max_epochs: int = 10
    max_steps: int = -1
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    seed: int = 0
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: Optional[int] = None
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    deterministic: bool = True


@dataclass
class LoggingConfig:
    """Where a run writes: `run_dir/name/` holds recipe, checkpoints, metrics.csv, wandb, summary."""

    run_dir: str = "runs"
    name: Optional[str] = None
    wandb: str = "offline"
    wandb_project: str = "qat"
    telemetry_every_n_steps: int = 50
    progress_bar: bool = True


@dataclass
class ExportConfig:
    """Export an int4 checkpoint at the end of the run (see docs/FORMAT.md)."""

    enabled: bool = False
    path: Optional[str] = None


@dataclass
class Recipe:
    """A whole QAT run. Every field is documented in the dataclass it belongs to."""

    name: str = "run"
    task: str = "classification"
    model: TargetConfig = field(default_factory=lambda: TargetConfig(_target_="qat.zoo.DigitsCNN"))
    data: TargetConfig = field(default_factory=lambda: TargetConfig(_target_="qat.datasets.DigitsDataModule"))
    quant: QuantSpec = field(default_factory=QuantSpec)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    resume: Optional[str] = None

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("logging.wandb", self.logging.wandb, WANDB_MODES)
        _choice("optimizer.name", self.optimizer.name, OPTIMIZERS)
        _choice("optimizer.schedule", self.optimizer.schedule, LR_SCHEDULES)
        for key, value in (("schedule.warmup_steps", self.schedule.warmup_steps),
                           ("schedule.calibration_batches", self.schedule.calibration_batches)):
            if value < 0:
                raise ConfigError(f"{key}={value} must be >= 0")
        if self.optimizer.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.optimizer.lr} must be > 0")


def _choice(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {', '.join(map(repr, allowed))}")


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
    schema = OmegaConf.structured(Recipe)
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        layers.append(OmegaConf.load(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    try:
        merged = OmegaConf.merge(schema, *layers)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise _unknown_key_error(err) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"invalid recipe value at '{key}': {msg}" if key else f"invalid recipe: {msg}") from None


def load_recipe_text(text: str) -> Recipe:
    """A recipe from YAML text (e.g. the copy stored in a checkpoint), with the same checks."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(text)
    try:
        return load_recipe(handle.name)
    finally:
        Path(handle.name).unlink()


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (saved in every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def recipe_hash(recipe: Recipe) -> str:
    """A short SHA-256 of the resolved recipe, stored in checkpoints and exports."""
    data = OmegaConf.to_container(OmegaConf.structured(recipe))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def quant_spec_hash(spec: QuantSpec) -> str:
    """SHA-256 of the quantization spec alone: resuming with another spec is refused."""
    data = OmegaConf.to_container(OmegaConf.structured(spec))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
