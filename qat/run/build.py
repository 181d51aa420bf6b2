"""The one place that turns a recipe into objects: model, data, Lightning module, callbacks, trainer.

Example:
    >>> run = build(load_recipe("recipes/digits_w4a4.yaml"))
    >>> run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.resume_from)
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar
from torch import nn

from qat.config import ConfigError
from qat.hf.load import load_tokenizer, weights_folder
from qat.lightning.checkpoint_io import AtomicCheckpointIO, RunCheckpoint, saved_step
from qat.lightning.distillation import Distillation, freeze_teacher
from qat.lightning.distributed import StopLaunchedRanks, is_launched_worker, process_group_timeout
from qat.lightning.float_reference import FloatReference
from qat.lightning.loader_progress import LoaderProgress
from qat.lightning.loggers import ResumedLogStep, make_loggers
from qat.lightning.module import QATModule
from qat.lightning.nonfinite import NonFiniteGuard
from qat.lightning.pruning import Pruning
from qat.lightning.schedule import QuantizationSchedule
from qat.lightning.sharding import ShardedQATModule, check_sharded_run, is_sharded, sharded_strategy
from qat.lightning.telemetry import QuantTelemetry
from qat.lightning.throughput import Throughput
from qat.recipe import Recipe, quant_spec_hash, recipe_hash, recipe_to_yaml
from qat.run.allocator import keep_freed_memory
from qat.run.models import (
    build_model,
    import_object,
    instantiate,
    load_float_model,
    load_teacher,
    model_from_checkpoint,
)
from qat.run.preflight import check_classes, class_count, new_directories, remove_new_directories
from qat.swap import PrepareReport
from qat.tasks import make_task

__all__ = ["Run", "RunDirectoryError", "build", "build_model", "check_writable", "import_object", "instantiate",
           "make_distillation", "model_from_checkpoint", "newest_checkpoint", "resolve_run_dir", "trainer_kwargs"]


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


def _versions(base: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in base.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))}


def newest_checkpoint(base: Path) -> Path:
    """What `resume=last` continues: the newest run under `base` (the highest `version_N` holding a last
    checkpoint; a new run takes the next number, and a copied directory keeps its own, unlike its
    mtimes), and of its last checkpoints (`last.ckpt`, and `last-vN.ckpt` copies from older qat
    versions) the one whose recorded global step is the highest, whatever its file name."""
    for _, version in sorted(_versions(base).items(), reverse=True):
        files = [p for p in (version / "checkpoints").glob("last*.ckpt") if re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)]
        if files:
            return max(sorted(files), key=saved_step)
    raise FileNotFoundError(f"resume=last: no checkpoints/last.ckpt under {base}")


def resolve_run_dir(recipe: Recipe) -> tuple[Path, Optional[str]]:
    """(run directory, checkpoint to resume from). A new run takes the next `version_N`."""
    base = Path(recipe.logging.run_dir) / (recipe.logging.name or recipe.name)
    if recipe.resume is None:
        versions = list(_versions(base))
        if is_launched_worker() and versions:  # rank 0 made this run's directory before it launched us
            return base / f"version_{max(versions)}", None
        return base / f"version_{max(versions, default=-1) + 1}", None
    if recipe.resume == "last":
        ckpt = newest_checkpoint(base)
    else:
        ckpt = Path(recipe.resume)
        if not ckpt.is_file():
            raise FileNotFoundError(f"resume={recipe.resume!r}: no such checkpoint file")
    return ckpt.parent.parent, str(ckpt)


class RunDirectoryError(ConfigError):
    """The run directory cannot be written; raised before any work, so nothing is half-written."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(folder: Path) -> Optional[str]:
    """Why files cannot be written in `folder` (or in the nearest existing folder above it, where it would be
    made), found by creating and removing a probe file; None when they can. Permission bits cannot tell:
    root ignores them, and a read-only mount refuses everyone."""
    existing = _nearest_existing(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".qat-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return "not a directory" if not existing.is_dir() else err.strerror or str(err)
    return None


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be written: it and its checkpoints/ (for a new run: the nearest
    folder that exists, where its folders will be made) must take a probe file."""
    for folder in (run_dir, run_dir / "checkpoints"):
        reason = unwritable_reason(folder)
        if reason is not None:
            existing = _nearest_existing(folder)
            where = "" if existing == run_dir else f" (in {existing})"
            raise RunDirectoryError(f"run directory {run_dir} is not writable{where}: {reason}")


def build_callbacks(recipe: Recipe, run_dir: Path, schedule: QuantizationSchedule,
                    resuming: bool = False) -> list[pl.Callback]:
    ckpt_dir = run_dir / "checkpoints"
    monitor, mode = {"classification": ("val/acc", "max"), "embedding": ("val/cosine", "max")}.get(
        recipe.task, ("val/loss", "min"))
    callbacks: list[pl.Callback] = [
        schedule,
        LoaderProgress(),
        QuantTelemetry(recipe.logging.telemetry_every_n_steps),
        NonFiniteGuard(ckpt_dir),
        StopLaunchedRanks(),
        RunCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, resuming=resuming,
                      every_n_train_steps=recipe.trainer.checkpoint_every_n_steps),
        RunCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                      auto_insert_metric_name=False, resuming=resuming),
    ]
    if resuming:
        callbacks.append(ResumedLogStep())
    if recipe.task in ("causal_lm", "language_model", "embedding"):
        callbacks.append(Throughput(make_task(recipe.task)))
    if recipe.logging.progress_bar:
        callbacks.append(RichProgressBar())
    return callbacks


def float_reference(recipe: Recipe) -> list[pl.Callback]:
    """The callback writing <run_dir>/float.safetensors at the end of warm-up, the float model `qat eval`
    compares with; none for a pretrained Hugging Face model (its source is the reference) or under FSDP2
    (a sharded model cannot be copied: `qat eval` says so)."""
    if recipe.model.hf is not None or is_sharded(recipe.trainer.strategy):
        return []
    return [FloatReference(recipe.schedule.warmup_steps)]


def build(recipe: Recipe, extra_callbacks: Optional[list[pl.Callback]] = None) -> Run:
    """Make every object of a run, write the resolved recipe into its directory, start nothing. The checks
    come before the directory is made; a failure after that removes what this run created, so an error
    never leaves a half-written run behind."""
    created: list[Path] = []
    try:
        return _build(recipe, extra_callbacks, created)
    except BaseException:
        remove_new_directories(created)
        raise


def _build(recipe: Recipe, extra_callbacks: Optional[list[pl.Callback]], created: list[Path]) -> Run:
    pl.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    keep_freed_memory()
    if recipe.trainer.cpu_threads is not None:
        torch.set_num_threads(recipe.trainer.cpu_threads)
    run_dir, resume_from = resolve_run_dir(recipe)
    check_writable(run_dir)  # before any work: a read-only run directory is one line, not a traceback later
    resume_step = saved_step(resume_from) if resume_from is not None else None
    floats: list[nn.Module] = []
    wants_teacher = _takes_teacher(recipe)  # a data module that generates text with the float model
    keep_float = (recipe.distill.enabled and recipe.distill.teacher == "initial") or recipe.task == "embedding" \
        or wants_teacher
    model, report = build_model(recipe, (lambda m: floats.append(copy.deepcopy(m))) if keep_float else None)
    datamodule = make_datamodule(recipe, model, teacher=floats[0] if wants_teacher else None)
    if recipe.model.hf is not None:
        datamodule.setup("fit")  # a corpus or tokenizer problem is an error now, before the run directory exists
    num_classes, classes_from = class_count(recipe, datamodule)
    check_sharded_run(recipe)
    task = make_task(recipe.task, num_classes)
    if recipe.task == "classification":  # else torchmetrics fails at the first validation, mid-run
        check_classes(model, datamodule, task, classes_from)
    created += new_directories(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = recipe_to_yaml(recipe)
    (run_dir / "recipe.yaml").write_text(resolved)
    info = {"recipe": resolved, "recipe_hash": recipe_hash(recipe),
            "quant_spec_hash": quant_spec_hash(recipe.quant)}
    if floats:  # what 'embedding' is measured against; its own copy only when the teacher is cast to bf16
        bf16_teacher = recipe.distill.enabled and recipe.distill.teacher_dtype == "bfloat16"
        task.reference = freeze_teacher(copy.deepcopy(floats[0]) if bf16_teacher else floats[0])
    module_class = ShardedQATModule if is_sharded(recipe.trainer.strategy) else QATModule
    module = module_class(model, task, num_classes, recipe.optimizer, checkpoint_info=info)
    schedule = QuantizationSchedule(recipe.schedule)
    if resume_from is None:
        schedule.model_setup(model)
    distillation = make_distillation(recipe, run_dir, floats[0] if floats else None) \
        if recipe.distill.enabled else None
    pruning = Pruning(recipe.prune) if recipe.prune.enabled else None
    callbacks = build_callbacks(recipe, run_dir, schedule, resuming=resume_from is not None)
    # Right after the schedule, distillation first: its 'warmup' teacher is taken before pruning starts.
    callbacks[1:1] = [c for c in (distillation, pruning) if c is not None]
    callbacks += [*(extra_callbacks or []), *float_reference(recipe)]
    trainer = pl.Trainer(**trainer_kwargs(recipe, run_dir, callbacks, resume_step))
    return Run(recipe, run_dir, model, report, module, datamodule, schedule, trainer, resume_from, distillation,
               pruning)


def _takes_teacher(recipe: Recipe) -> bool:
    return "teacher" in _parameters(import_object(recipe.data._target_, "data")) and "teacher" not in recipe.data.args


def make_datamodule(recipe: Recipe, model: Optional[nn.Module] = None,
                    teacher: Optional[nn.Module] = None) -> pl.LightningDataModule:
    """The recipe's data module; a Hugging Face model's tokenizer and limits (from `model.config`, or the
    source's config when no model is given) go to the arguments it takes (`tokenizer`, `max_positions`,
    `vocab_size`), and to one that takes a `teacher` (`qat.data.GeneratedTextDataModule`) the recipe's float
    model before prepare: `teacher`, or the float model loaded again (what `qat eval` does)."""
    factory = import_object(recipe.data._target_, "data")
    extra: dict[str, Any] = {}
    if _takes_teacher(recipe):
        extra["teacher"] = teacher if teacher is not None else load_float_model(recipe)
    if recipe.model.hf is not None:
        accepted = _parameters(factory)
        if "tokenizer" in accepted and "tokenizer" not in recipe.data.args:
            extra["tokenizer"] = load_tokenizer(recipe.model.hf)
        config = model.config if model is not None and hasattr(model, "config") else _hf_config(recipe)
        limits = {"max_positions": getattr(config, "max_position_embeddings", None),
                  "vocab_size": getattr(config, "vocab_size", None)}
        extra.update({k: v for k, v in limits.items() if v is not None and k in accepted and k not in recipe.data.args})
    return instantiate(recipe.data, "data", **extra)


def _parameters(factory: Any) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _hf_config(recipe: Recipe) -> Any:
    from transformers import AutoConfig


    return AutoConfig.from_pretrained(str(weights_folder(recipe.model.hf)))


def make_distillation(recipe: Recipe, run_dir: Path, initial: Optional[nn.Module]) -> Distillation:
    """The callback for `recipe.distill`; `initial` is the float model captured before prepare."""
    config = recipe.distill
    if config.teacher == "initial":
        teacher = initial
    elif config.teacher == "warmup":
        teacher = None
    else:
        teacher = load_teacher(config.teacher, recipe)
    return Distillation(config, run_dir, teacher, available_from=recipe.schedule.warmup_steps)


def _strategy(name: str) -> Any:
    """Lightning's strategy; plain 'ddp' lets parameters go unused, which the QAT schedule needs:
    quantizer scales take no part in the loss during FP warm-up, and none once frozen."""
    if name == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True, timeout=process_group_timeout())
    return name


def trainer_kwargs(recipe: Recipe, run_dir: Path, callbacks: list[pl.Callback],
                   resume_step: Optional[int] = None) -> dict[str, Any]:
    t = recipe.trainer
    kwargs: dict[str, Any] = {
        "max_epochs": t.max_epochs, "max_steps": t.max_steps, "accelerator": t.accelerator,
        "devices": t.devices, "strategy": sharded_strategy(t.strategy, t.devices) or _strategy(t.strategy),
        "precision": t.precision,
        "gradient_clip_val": t.gradient_clip_val, "log_every_n_steps": t.log_every_n_steps,
        "deterministic": t.deterministic, "default_root_dir": str(run_dir), "callbacks": callbacks,
        "logger": make_loggers(run_dir, recipe.logging.wandb, recipe.logging.wandb_project,
                               recipe.logging.name or recipe.name, resume_step),
        "enable_progress_bar": recipe.logging.progress_bar, "enable_model_summary": False,
        "use_distributed_sampler": False,  # ResumableLoader shards by rank itself
        "accumulate_grad_batches": t.accumulate_grad_batches,
        "plugins": [AtomicCheckpointIO()],  # a failed write keeps the previous checkpoint intact
    }
    if t.val_check_interval is not None:
        kwargs["val_check_interval"] = t.val_check_interval
    for key in ("limit_train_batches", "limit_val_batches"):
        if getattr(t, key) is not None:
            kwargs[key] = getattr(t, key)
    return kwargs
