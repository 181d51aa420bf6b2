"""A run's deployable int4 file: written after training (`export_run`) or later from a training
checkpoint (`export_checkpoint`, the `qat export` command). Both go through `export_trained`, so a
file made either way holds the same weights, architecture, recipe hash and golden inputs.

Example:
    >>> report = export_checkpoint("runs/digits/version_0", "model.safetensors")
    >>> print(report)                                   # layers, bits per weight, file size
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from qat.data.loading import main_validation_loader, validation_loaders
from qat.export import export_model, load
from qat.export.manifest import read_manifest
from qat.export.reader import read_header
from qat.export.report import SizeReport, size_report
from qat.export.targets.cli import run_convert
from qat.lightning.module import QATModule
from qat.prune import remove_masks
from qat.recipe import load_recipe_text, recipe_hash
from qat.run.build import Run
from qat.run.models import architecture_of, instantiate, model_from_checkpoint

GOLDEN_BYTES = 64 * 1024  # golden inputs stored in the file: at most this many bytes (at least one sample)
PROFILE_SAMPLES = 1024  # validation samples the calibration profile (qat.monitor.profile) is computed on
PROFILE_TOKENS = 16384  # ... or fewer sequences of a token model: this many tokens in all


def golden_batch(datamodule: Any, count: int = 4) -> Optional[tuple[Tensor, ...]]:
    """The model inputs of the first `count` validation samples of a Lightning data module (fewer when
    they would take more than GOLDEN_BYTES: one 64x64 RGB image is 48 KiB), or None.

    A batch is `(inputs, targets)`, a dict with `input_ids` (and `attention_mask`), or a tensor.
    """
    try:
        datamodule.setup("validate")
        batch = next(iter(main_validation_loader(datamodule)))
    except Exception:  # golden data is optional: no validation data, no golden data
        return None
    if isinstance(batch, dict):
        batch = tuple(batch[key] for key in ("input_ids", "attention_mask") if key in batch)
    elif isinstance(batch, (tuple, list)):
        batch = (batch[0],)
    else:
        batch = (batch,)
    if not batch or not all(isinstance(t, Tensor) for t in batch):
        return None
    per_sample = sum(t[:1].numel() * t.element_size() for t in batch)
    count = max(1, min(count, GOLDEN_BYTES // max(1, per_sample)))
    return tuple(t[:count].contiguous() for t in batch)


def export_trained(model: nn.Module, out_path: str | os.PathLike, architecture: dict, recipe_hash: str,
                   datamodule: Any, sparsity: Optional[dict] = None) -> SizeReport:
    """Write `model` (prepared, masks removed) to `out_path` with golden inputs and the calibration profile
    (for the reference-free drift monitor) from `datamodule`'s validation data."""
    inputs = golden_batch(datamodule) if datamodule is not None else None  # for `qat verify`
    export_model(model, out_path, architecture=architecture, recipe_hash=recipe_hash,
                 sparsity=sparsity, golden_inputs=inputs)
    if datamodule is not None and architecture is not None:
        add_calibration_profile(out_path, datamodule)
    header = read_header(out_path)
    return size_report(header, read_manifest(header))  # the file as written, its profile included


def profile_samples(batch: Any) -> int:
    """How many validation samples the profile takes: PROFILE_SAMPLES images (float inputs), but token sequences
    only up to PROFILE_TOKENS tokens in all (at least 16 sequences): a language model's forward is the cost."""
    from qat.monitor.profile import model_inputs

    inputs = model_inputs(batch)[0]
    if inputs.is_floating_point() or inputs.dim() < 2:
        return PROFILE_SAMPLES
    return min(PROFILE_SAMPLES, max(16, PROFILE_TOKENS // max(1, inputs[0].numel())))


def add_calibration_profile(path: str | os.PathLike, datamodule: Any) -> None:
    """Store the calibration profile (qat.monitor.profile) of the loaded file on up to PROFILE_SAMPLES
    validation samples; without one (no validation data, an output that is not logits) warn and go on."""
    from qat.monitor.profile import write_profile  # imported here: qat.monitor sits above the export

    try:
        datamodule.setup("validate")
        loader = main_validation_loader(datamodule)
        write_profile(path, loader, max_samples=profile_samples(next(iter(loader))))
    except Exception as err:  # the profile is optional: a file without one still loads and verifies
        warnings.warn(f"no calibration profile in {path}: {type(err).__name__}: {err}", stacklevel=2)


def export_run(run: Run) -> dict[str, Any]:
    """Write the int4 checkpoint (`recipe.export.path`, default `<run_dir>/model.safetensors`; pruning
    masks baked into the weights), load it back with `qat.load` and measure it: summary entries."""
    recipe = run.recipe
    path = Path(recipe.export.path or run.run_dir / "model.safetensors")
    model = copy.deepcopy(run.model)
    sparsity = remove_masks(model).as_dict() if run.pruning is not None else None
    size = export_trained(model, path, architecture_of(recipe, model), recipe_hash(recipe), run.datamodule, sparsity)
    evaluator = QATModule(load(path), run.module.task_spec)
    return {"int4": evaluator.evaluate_loaders(validation_loaders(run.datamodule)),
            "export": {"path": str(path), "file_bytes": size.file_bytes, "bits_per_weight": size.bits_per_weight}}


def export_checkpoint(ckpt_path_or_run_dir: str | os.PathLike, out_path: str | os.PathLike) -> SizeReport:
    """Export a training checkpoint (a Lightning .ckpt or a run directory) to a qat int4 file."""
    source = Path(ckpt_path_or_run_dir)
    if not source.exists():
        raise FileNotFoundError(f"no checkpoint or run directory at {source}")
    model, architecture, file_recipe_hash = model_from_checkpoint(source)
    return export_trained(model, out_path, architecture, file_recipe_hash, _checkpoint_datamodule(source))


def _checkpoint_datamodule(path: Path) -> Any:
    """The data module of a checkpoint's recipe, or None when it cannot be built (golden data is optional)."""
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    try:
        info = torch.load(path, map_location="cpu", weights_only=True).get("qat") or {}
        return instantiate(load_recipe_text(info["recipe"]).data, "data")
    except Exception:
        return None


def run_export(args: argparse.Namespace) -> int:
    """Handler of `qat export`: 0 on success, 1 with a message on stderr otherwise."""
    if getattr(args, "to", None):  # `qat export FILE --to TARGET`: convert a qat file
        return run_convert(args)
    try:
        report = export_checkpoint(args.checkpoint, args.output)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError / ExportError / a non-qat checkpoint
        print(f"qat export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    print(report)
    return 0
