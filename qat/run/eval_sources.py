"""What `qat eval` compares: the float reference, PTQ, QAT and the int4 file, from one path.

    run directory   recipe and QAT model from checkpoints/last.ckpt, float reference from
                    float.safetensors (written at the end of FP warm-up), int4 from model.safetensors
    .ckpt           the same, the run directory being the checkpoint's grandparent
    int4 file       a `qat.load` file; recipe and float reference from its run directory
                    (or `recipe_path` / `float_path`)

A Hugging Face run (`model.hf`) writes no float.safetensors: its float reference is the
pretrained model it started from, loaded again from `model.hf` (unless `float_path` is given).

PTQ is computed on the spot: the float weights with the recipe's quantization spec,
calibrated on `schedule.calibration_batches` training batches (round-to-nearest of the
same spec, or GPTQ when the recipe's `schedule.weight_rounding` is 'gptq'; no training).
When the run has no int4 file, the QAT model is exported to a temporary one. Every unusable input
raises `EvalError` naming the problem.

Example:
    >>> sources = resolve("runs/digits_w2a4/version_0")
    >>> models = sources.models()      # {'float': ..., 'ptq': ..., 'qat': ..., 'int4': ...}
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import safetensors.torch
import torch
from torch import nn

from qat.control import calibrate, set_fake_quant
from qat.eval.outputs import EvalError
from qat.export import CheckpointError, export_model
from qat.export.manifest import read_manifest
from qat.export.reader import read_header
from qat.lightning.float_reference import FLOAT_FILE
from qat.prune import remove_masks
from qat.ptq import gptq_round
from qat.recipe import Recipe, load_recipe, load_recipe_text, recipe_to_yaml, typed_recipe
from qat.run.build import build_model, make_datamodule, model_from_checkpoint
from qat.run.export import export_checkpoint
from qat.run.models import architecture_of, load_float_model

INT4_FILE = "model.safetensors"


@dataclass
class EvalSources:
    """The recipe, and where each compared model comes from."""

    recipe: Recipe
    source: Path
    float_path: Optional[Path]  # None: the recipe's pretrained Hugging Face model is the float reference
    checkpoint: Optional[Path] = None
    int4_path: Optional[Path] = None
    trained: Optional[nn.Module] = None  # the QAT model in memory (end of a run) instead of the checkpoint's
    data: Optional[pl.LightningDataModule] = None  # the run's data module, set up (end of a run)
    _tmp: list = field(default_factory=list, repr=False)

    def datamodule(self) -> pl.LightningDataModule:
        """The recipe's data module (a Hugging Face model's tokenizer and limits passed in), set up; the
        run's own when it is given (`data`), not made and set up again."""
        if self.data is not None:
            return self.data
        data = make_datamodule(self.recipe)
        data.setup("fit")
        return data

    def describe(self) -> str:
        """' (model on data)' for error messages."""
        model = self.recipe.model.hf.path if self.recipe.model.hf is not None else self.recipe.model.target
        return f" ({model} on {self.recipe.data._target_})"

    def float_model(self) -> nn.Module:
        """The recipe's model holding the float reference weights."""
        model = load_float_model(self.recipe)
        if self.float_path is not None:
            _load_float(model, _read_state(self.float_path), self)
        return model.eval()

    def ptq_model(self, calibration_batches: list) -> nn.Module:
        """Float weights quantized with the recipe's spec and calibrated, no training."""
        state = _read_state(self.float_path) if self.float_path is not None else None
        model, _ = build_model(self.recipe, on_float=None if state is None else
                               lambda float_model: _load_float(float_model, state, self))
        set_fake_quant(model, weights=True, activations=True)
        calibrate(model, calibration_batches, weights=False)  # weight ranges: set by prepare from these weights
        schedule = self.recipe.schedule
        if schedule.weight_rounding == "gptq":
            gptq_round(model, calibration_batches, schedule.gptq_damping, schedule.gptq_act_order)
        return model.eval()

    def qat_model(self) -> Optional[nn.Module]:
        """The trained fake-quant model (None for a bare int4 file)."""
        if self.trained is not None:
            return copy.deepcopy(self.trained).eval()
        if self.checkpoint is None:
            return None

        return model_from_checkpoint(self.checkpoint)[0]

    def int4_file(self) -> Path:
        """The int4 file: the run's, or the checkpoint exported to a temporary file."""
        if self.int4_path is not None:
            return self.int4_path

        tmp = tempfile.TemporaryDirectory(prefix="qat-eval-")
        self._tmp.append(tmp)
        self.int4_path = Path(tmp.name) / INT4_FILE
        if self.trained is not None:
            model = copy.deepcopy(self.trained)
            remove_masks(model)
            export_model(model, self.int4_path, architecture=architecture_of(self.recipe, model))
        else:
            export_checkpoint(self.checkpoint, self.int4_path)
        return self.int4_path


def _load_float(model: nn.Module, state: dict[str, torch.Tensor], sources: EvalSources) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise EvalError(f"float reference {sources.float_path} does not fit the recipe's model "
                        f"({sources.recipe.model._target_}): {str(err).splitlines()[0]}") from None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise EvalError(f"float reference {path} is not a readable safetensors state dict: {err}") from None


def _checkpoint_recipe(path: Path) -> Recipe:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike
        raise EvalError(f"{path} is not a qat checkpoint: torch.load failed ({type(err).__name__})") from None
    info = checkpoint.get("qat") if isinstance(checkpoint, dict) else None
    if not info or "recipe" not in info:
        raise EvalError(f"{path} is not a qat training checkpoint (no recipe inside)")
    return load_recipe_text(info["recipe"])


def _is_qat_file(path: Path) -> bool:
    try:
        read_manifest(read_header(str(path)))
    except CheckpointError as err:
        raise EvalError(f"{path} is not a qat int4 checkpoint: {err}") from None
    return True


def _float_reference(run_dir: Optional[Path], float_path: Optional[str], what: Path, recipe: Recipe,
                     ) -> Optional[Path]:
    if float_path is not None:
        path = Path(float_path)
    elif run_dir is not None and (run_dir / FLOAT_FILE).is_file():
        path = run_dir / FLOAT_FILE
    elif recipe.model.hf is not None:
        return None  # the pretrained model of model.hf
    else:
        raise EvalError(f"no float reference for {what}: expected {FLOAT_FILE} in its run directory (written at "
                        f"the end of FP warm-up by runs of this version of qat); pass --float FLOAT.safetensors")
    if not path.is_file():
        raise EvalError(f"float reference {path} does not exist")
    return path


def resolve(path: str | Path, float_path: Optional[str] = None, recipe_path: Optional[str] = None,
            overrides: Optional[list[str]] = None) -> EvalSources:
    """The `EvalSources` of a run directory, a training checkpoint or an int4 file."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"nothing to evaluate at {path}: no such file or directory")
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise EvalError(f"{path} is not a qat run directory: no checkpoints/last.ckpt")
        run_dir, int4 = path, path / INT4_FILE
    elif path.suffix == ".safetensors" and _is_qat_file(path):
        checkpoint, run_dir, int4 = None, path.parent, path
    else:
        checkpoint, run_dir = path, path.parent.parent
        int4 = run_dir / INT4_FILE
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, overrides)
    elif checkpoint is not None:
        recipe = _with_overrides(_checkpoint_recipe(checkpoint), overrides)
    elif (run_dir / "recipe.yaml").is_file():
        recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    else:
        raise EvalError(f"no recipe for {path}: it is not in a run directory; pass --recipe RECIPE.yaml")
    float_file = _float_reference(run_dir, float_path, path, recipe)
    return EvalSources(recipe, path, float_file, checkpoint, int4 if int4.is_file() else None)


def _with_overrides(recipe: Recipe, overrides: Optional[list[str]]) -> Recipe:
    """`recipe` with `key=value` overrides, checked like `load_recipe`'s."""
    if not overrides:
        return recipe
    from omegaconf import OmegaConf


    return typed_recipe([OmegaConf.create(recipe_to_yaml(recipe)), OmegaConf.from_dotlist(list(overrides))])
