"""The one place that turns a recipe into objects: model, data, Lightning module, callbacks, trainer.

Example:
    >>> run = build(load_recipe("recipes/digits_w4a4.yaml"))
    >>> run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.resume_from)
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from torch import nn

from qat.config import ConfigError
from qat.data_loading import LoaderProgress
from qat.lightning.checkpoint_io import AtomicCheckpointIO
from qat.lightning.distillation import Distillation, make_distillation
from qat.lightning.distributed import StopLaunchedRanks, is_launched_worker, process_group_timeout
from qat.lightning.loggers import make_loggers
from qat.lightning.module import QATModule
from qat.lightning.nonfinite import NonFiniteGuard
from qat.lightning.pruning import Pruning, pruned_layers
from qat.lightning.schedule import QuantizationSchedule
from qat.lightning.sharding import ShardedQATModule, check_sharded_run, is_sharded, sharded_strategy
from qat.lightning.telemetry import QuantTelemetry
from qat.prepare import PrepareReport, prepare
from qat.prune import attach_masks, remove_masks
from qat.recipe import Recipe, TargetConfig, quant_spec_hash, recipe_hash, recipe_to_yaml


@dataclass
class Run:
    """Everything a training run is made of; `trainer.fit(module, datamodule, ckpt_path=resume_from)` runs it."""

    recipe: Recipe
    run_dir: Path
    model: nn.Module
    report: PrepareReport
    module: QATModule
    datamodule: pl.LightningDataModule
    schedule: QuantizationSchedule
    trainer: pl.Trainer
    resume_from: Optional[str]
    distillation: Optional[Distillation] = None
    pruning: Optional[Pruning] = None


def import_object(path: str, key: str) -> Any:
    """The object at import path `pkg.module.Name`; `key` names the recipe field in errors."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}._target_={path!r} is not an import path like 'my_pkg.MyModel'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported: {err}") from None


def instantiate(target: TargetConfig, key: str, **extra: Any) -> Any:
    """Call the class or function at `target._target_` with `target.args` (and `extra`)."""
    factory = import_object(target._target_, key)
    try:
        return factory(**{**target.args, **extra})
    except TypeError as err:
        raise ConfigError(f"{key}: {target._target_}(**{dict(target.args)}) failed: {err}") from None


def build_model(recipe: Recipe, on_float: Optional[Callable[[nn.Module], None]] = None,
                ) -> tuple[nn.Module, PrepareReport]:
    """The user's float model from the recipe, prepared with `recipe.quant` (and given all-ones
    pruning masks when `recipe.prune` is on); `on_float` sees the float model before prepare."""
    model = instantiate(recipe.model, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={recipe.model._target_!r} did not return an nn.Module")
    if on_float is not None:
        on_float(model)
    model, report = prepare(model, recipe.quant)
    if recipe.prune.enabled:
        attach_masks(model, pruned_layers(model, recipe.prune)[0])
    return model, report


def resolve_run_dir(recipe: Recipe) -> tuple[Path, Optional[str]]:
    """(run directory, checkpoint to resume from). A new run takes the next `version_N`."""
    base = Path(recipe.logging.run_dir) / (recipe.logging.name or recipe.name)
    if recipe.resume is None:
        versions = [int(m.group(1)) for p in base.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
        if is_launched_worker() and versions:  # rank 0 made this run's directory before it launched us
            return base / f"version_{max(versions)}", None
        return base / f"version_{max(versions, default=-1) + 1}", None
    if recipe.resume == "last":
        candidates = sorted(base.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"resume=last: no checkpoints/last.ckpt under {base}")
        ckpt = candidates[-1]
    else:
        ckpt = Path(recipe.resume)
        if not ckpt.is_file():
            raise FileNotFoundError(f"resume={recipe.resume!r}: no such checkpoint file")
    return ckpt.parent.parent, str(ckpt)


def build_callbacks(recipe: Recipe, run_dir: Path, schedule: QuantizationSchedule) -> list[pl.Callback]:
    ckpt_dir = run_dir / "checkpoints"
    monitor, mode = ("val/acc", "max") if recipe.task == "classification" else ("val/loss", "min")
    callbacks: list[pl.Callback] = [
        schedule,
        LoaderProgress(),
        QuantTelemetry(recipe.logging.telemetry_every_n_steps),
        NonFiniteGuard(ckpt_dir),
        StopLaunchedRanks(),
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                        every_n_train_steps=recipe.trainer.checkpoint_every_n_steps),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
    ]
    if recipe.logging.progress_bar:
        callbacks.append(RichProgressBar())
    return callbacks


def build(recipe: Recipe, extra_callbacks: Optional[list[pl.Callback]] = None) -> Run:
    """Make every object of a run, write the resolved recipe into its directory, start nothing."""
    pl.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    run_dir, resume_from = resolve_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    floats: list[nn.Module] = []
    keep_float = recipe.distill.enabled and recipe.distill.teacher == "initial"
    model, report = build_model(recipe, (lambda m: floats.append(copy.deepcopy(m))) if keep_float else None)
    datamodule = instantiate(recipe.data, "data")
    num_classes = getattr(datamodule, "num_classes", None) or recipe.model.args.get("classes", 10)
    info = {"recipe": recipe_to_yaml(recipe), "recipe_hash": recipe_hash(recipe),
            "quant_spec_hash": quant_spec_hash(recipe.quant)}
    check_sharded_run(recipe)
    module_class = ShardedQATModule if is_sharded(recipe.trainer.strategy) else QATModule
    module = module_class(model, recipe.task, num_classes, recipe.optimizer, checkpoint_info=info)
    schedule = QuantizationSchedule(recipe.schedule)
    if resume_from is None:
        schedule.model_setup(model)
    distillation = make_distillation(recipe, run_dir, floats[0] if floats else None) \
        if recipe.distill.enabled else None
    pruning = Pruning(recipe.prune) if recipe.prune.enabled else None
    callbacks = build_callbacks(recipe, run_dir, schedule)
    # Right after the schedule, distillation first: its 'warmup' teacher is taken before pruning starts.
    callbacks[1:1] = [c for c in (distillation, pruning) if c is not None]
    trainer = pl.Trainer(**trainer_kwargs(recipe, run_dir, callbacks + list(extra_callbacks or [])))
    return Run(recipe, run_dir, model, report, module, datamodule, schedule, trainer, resume_from, distillation,
               pruning)


def _strategy(name: str) -> Any:
    """Lightning's strategy; plain 'ddp' lets parameters go unused, which the QAT schedule needs:
    quantizer scales take no part in the loss during FP warm-up, and none once frozen."""
    if name == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True, timeout=process_group_timeout())
    return name


def trainer_kwargs(recipe: Recipe, run_dir: Path, callbacks: list[pl.Callback]) -> dict[str, Any]:
    t = recipe.trainer
    kwargs: dict[str, Any] = {
        "max_epochs": t.max_epochs, "max_steps": t.max_steps, "accelerator": t.accelerator,
        "devices": t.devices, "strategy": sharded_strategy(t.strategy, t.devices) or _strategy(t.strategy),
        "precision": t.precision,
        "gradient_clip_val": t.gradient_clip_val, "log_every_n_steps": t.log_every_n_steps,
        "deterministic": t.deterministic, "default_root_dir": str(run_dir), "callbacks": callbacks,
        "logger": make_loggers(run_dir, recipe.logging.wandb, recipe.logging.wandb_project,
                               recipe.logging.name or recipe.name),
        "enable_progress_bar": recipe.logging.progress_bar, "enable_model_summary": False,
        "use_distributed_sampler": False,  # ResumableLoader shards by rank itself
        "plugins": [AtomicCheckpointIO()],  # a failed write keeps the previous checkpoint intact
    }
    for key in ("limit_train_batches", "limit_val_batches"):
        if getattr(t, key) is not None:
            kwargs[key] = getattr(t, key)
    return kwargs


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict, str]:
    """(prepared model with trained weights and qparams, architecture dict, recipe hash) from a
    Lightning checkpoint written by a qat run, or from a run directory (its checkpoints/last.ckpt).
    Pruning masks are baked into the weights and dropped."""
    from qat.recipe import load_recipe_text

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
    architecture = {"_target_": recipe.model._target_, **recipe.model.args}  # the form qat.load rebuilds
    return model.eval(), architecture, info.get("recipe_hash", "")
