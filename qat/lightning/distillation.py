"""Distillation callback: a frozen teacher adds KD (and feature) loss terms to the training loss.

The teacher (`DistillConfig.teacher`):

    initial      a deep copy of the float model taken before `prepare` (for a pretrained model)
    warmup       the float model at the end of FP warm-up, written once to
                 `<run_dir>/teacher.safetensors` and referenced from then on
    a path       a qat training checkpoint (.ckpt), a .safetensors state dict of the
                 recipe's model, or a Hugging Face model directory (config.json; needs transformers)

It is kept on this callback, not on the LightningModule, so no checkpoint holds its
weights: the callback's state holds a reference instead (source, file, SHA-256 of its
weights), checked when a run resumes. It runs in eval mode, without gradients, in float32
or bfloat16, on each rank (DDP) on its own. The loss terms go through
`QATModule.loss_hooks`:

    kd       = r(t) * weight * T^2 * KL(teacher || student)            (qat.distill.kd_logit_loss)
    feature  = r(t) * feature_weight * sum of feature losses            (student -> teacher layers)
    r(t)     = min(1, (t - start + 1) / ramp_steps)  (1 without a ramp), 0 before start

`task_weight: 0` trains on the distillation terms alone (labels-free).

Example:
    >>> callback = Distillation(DistillConfig(enabled=True, teacher="warmup"), run_dir, available_from=230)
    >>> pl.Trainer(callbacks=[schedule, callback]).fit(module, datamodule=dm)
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import safetensors.torch
import torch
from torch import Tensor, nn

from qat.distill import FeatureTaps, feature_loss, kd_logit_loss
from qat.prepare import unprepare
from qat.recipe import DistillConfig

TEACHER_FILE = "teacher.safetensors"


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the names and raw bytes of `model`'s state_dict tensors (its identity)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, Tensor):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def float_copy(model: nn.Module) -> nn.Module:
    """A float deep copy of a (prepared) model: quantizers and pruning masks dropped, weights as they are."""
    return unprepare(copy.deepcopy(model))


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for good."""
    return teacher.eval().requires_grad_(False)


class Distillation(pl.Callback):
    """Adds the distillation loss terms of `config` to the LightningModule's training loss.

    Args:
        config: the recipe's `distill` section.
        run_dir: where a 'warmup' teacher is written (default: the trainer's root directory).
        teacher: the teacher for 'initial' and path sources (see `qat.build`); None for 'warmup'.
        available_from: the step the 'warmup' teacher is taken at (the end of FP warm-up).
    """

    def __init__(self, config: DistillConfig, run_dir: Optional[str | Path] = None,
                 teacher: Optional[nn.Module] = None, available_from: int = 0) -> None:
        if teacher is None and config.teacher != "warmup":
            raise ValueError(f"distill.teacher={config.teacher!r} needs a teacher model (see qat.build)")
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.available_from = available_from if config.teacher == "warmup" else 0
        self.start = max(config.start_step, self.available_from)
        self.teacher: Optional[nn.Module] = None
        self.reference = {"source": config.teacher, "file": None, "sha256": None}
        self._pending: Optional[dict] = None
        self._student_taps: Optional[FeatureTaps] = None
        self._teacher_taps: Optional[FeatureTaps] = None
        self._trainer: Optional[pl.Trainer] = None
        if teacher is not None:
            self._set_teacher(teacher)

    # ---- teacher ------------------------------------------------------------------------
    def _set_teacher(self, teacher: nn.Module, sha256: Optional[str] = None) -> None:
        self.reference["sha256"] = sha256 or weights_sha256(teacher)
        dtype = torch.bfloat16 if self.config.teacher_dtype == "bfloat16" else None
        self.teacher = freeze_teacher(teacher.to(dtype=dtype) if dtype else teacher)
        if self.config.features:
            self._teacher_taps = FeatureTaps(self.teacher, self.config.features.values(), role="teacher")

    def _snapshot(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Take the 'warmup' teacher from the student and write it (rank 0) to the run directory."""
        if self._student_taps is not None:
            self._student_taps.remove()  # hooks must not be copied into the teacher
        teacher = float_copy(model)
        if self._student_taps is not None:
            self._student_taps.attach()
        path = (self.run_dir or Path(trainer.default_root_dir)) / TEACHER_FILE
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
        self.reference["file"] = str(path)
        self._set_teacher(teacher)

    def _restore(self, model: nn.Module) -> None:
        """Resume: rebuild the 'warmup' teacher from its file and check it is the one referenced."""
        saved, self._pending = self._pending, None
        path = Path(saved["file"])
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume distillation: the teacher file {path} is gone")
        teacher = float_copy(model)
        teacher.load_state_dict(safetensors.torch.load_file(str(path)))
        self._check_sha(weights_sha256(teacher), saved)
        self.reference["file"] = saved["file"]
        self._set_teacher(teacher, saved["sha256"])

    @staticmethod
    def _check_sha(actual: str, saved: dict) -> None:
        if saved.get("sha256") and actual != saved["sha256"]:
            raise ValueError(f"cannot resume distillation: the teacher ({saved['source']}) is not the one this "
                             f"checkpoint was trained with (SHA-256 {actual[:12]} vs {saved['sha256'][:12]})")

    # ---- loss ---------------------------------------------------------------------------
    def ramp(self, step: int) -> float:
        """r(t): 0 before the start, then a linear ramp over `ramp_steps` steps to 1."""
        if self.teacher is None or step < self.start:
            return 0.0
        if self.config.ramp_steps <= 0:
            return 1.0
        return min(1.0, (step - self.start + 1) / self.config.ramp_steps)

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's output for `x` (cast to its dtype if floating), as float32."""
        parameter = next(self.teacher.parameters(), None)
        if parameter is not None and parameter.device != x.device:
            self.teacher.to(x.device)
        if parameter is not None and x.is_floating_point():
            x = x.to(parameter.dtype)
        return self.teacher(x).float()

    def loss_terms(self, x: Tensor, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The weighted distillation terms for one training batch (a `QATModule` loss hook)."""
        ramp = self.ramp(self._trainer.global_step if self._trainer is not None else self.start)
        if ramp == 0.0:
            return {}
        c = self.config
        terms = {"kd": (ramp * c.weight) * kd_logit_loss(logits, self.teacher_logits(x), c.temperature)}
        if c.features:
            loss = feature_loss(self._student_taps, self._teacher_taps, c.features, c.feature_loss)
            terms["feature"] = (ramp * c.feature_weight) * loss
            self._student_taps.clear()
            self._teacher_taps.clear()
        return terms

    # ---- hooks --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.loss_terms not in pl_module.loss_hooks:
            pl_module.loss_hooks.append(self.loss_terms)
        pl_module.task_loss_weight = self.config.task_weight
        if self.config.features and self._student_taps is None:
            self._student_taps = FeatureTaps(pl_module.model, self.config.features.keys(), role="student")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            self._restore(pl_module.model)
        elif self.teacher is None and trainer.global_step >= self.available_from:
            self._snapshot(trainer, pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.teacher is None and trainer.global_step >= self.available_from:
            self._snapshot(trainer, pl_module.model)  # the step that ended warm-up has just run
        if self._student_taps is not None:
            self._student_taps.clear()

    def state_dict(self) -> dict:
        return dict(self.reference)

    def load_state_dict(self, state: dict) -> None:
        if state.get("source") != self.config.teacher:
            raise ValueError(f"cannot resume: the checkpoint distilled from teacher {state.get('source')!r}, "
                             f"the recipe says {self.config.teacher!r}")
        if self.config.teacher == "warmup":
            self._pending = dict(state) if state.get("file") else None
        else:
            self._check_sha(self.reference["sha256"], state)


# ---- teachers from files ----------------------------------------------------------------------
class LogitsOnly(nn.Module):
    """Wraps a model whose output has `.logits` (Hugging Face) so that it returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        output = self.model(x)
        return output.logits if hasattr(output, "logits") else output


def load_hf_teacher(directory: Path, task: str) -> nn.Module:
    """A Hugging Face model from `directory` (causal LM for 'language_model', else sequence classifier),
    wrapped in `LogitsOnly`: its layer names for feature distillation start with 'model.'."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"distill.teacher={str(directory)!r} is a Hugging Face directory: "
                          "install transformers (pip install 'qat[hf]')") from None
    auto = transformers.AutoModelForCausalLM if task == "language_model" else \
        transformers.AutoModelForSequenceClassification
    return LogitsOnly(auto.from_pretrained(str(directory)))


def load_teacher(source: str, recipe: Any) -> nn.Module:
    """The teacher at path `source`: a qat .ckpt (the model as that run ended, fake-quant state
    included), a .safetensors state dict of `recipe.model`, or a Hugging Face directory.

    Loading draws nothing from the global RNGs, so the student's initialization is unchanged.
    """
    from qat.build import instantiate, model_from_checkpoint  # late: qat.build imports this module

    path = Path(source)
    with torch.random.fork_rng(devices=[]):
        if path.is_dir() and (path / "config.json").is_file():
            return load_hf_teacher(path, recipe.task)
        if path.is_file() and path.suffix == ".ckpt":
            return model_from_checkpoint(path)[0]
        if path.is_file() and path.suffix == ".safetensors":
            model = instantiate(recipe.model, "model")
            model.load_state_dict(safetensors.torch.load_file(str(path)))
            return model
    raise FileNotFoundError(f"distill.teacher={source!r} is not 'initial', 'warmup', a .ckpt file, a .safetensors "
                            "state dict of the recipe's model, or a Hugging Face model directory (with config.json)")


def make_distillation(recipe: Any, run_dir: Path, initial: Optional[nn.Module]) -> Distillation:
    """The callback for `recipe.distill`; `initial` is the float model captured before prepare."""
    config = recipe.distill
    if config.teacher == "initial":
        teacher = initial
    elif config.teacher == "warmup":
        teacher = None
    else:
        teacher = load_teacher(config.teacher, recipe)
    return Distillation(config, run_dir, teacher, available_from=recipe.schedule.warmup_steps)
