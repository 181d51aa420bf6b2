"""Distillation callback: a frozen teacher adds KD (and feature) loss terms to the training loss.

The teacher (`DistillConfig.teacher`):

    initial      a deep copy of the float model taken before `prepare` (for a pretrained model)
    warmup       the float model at the end of FP warm-up, written once to
                 `<run_dir>/teacher.safetensors` and referenced from then on
    a path       a qat training checkpoint (.ckpt), a .safetensors state dict of the
                 recipe's model, or a Hugging Face model directory (loaded by
                 `qat.run.models.load_teacher`, the loader of the student too)

It is kept on this callback, not on the LightningModule, so no checkpoint holds its
weights: the callback's state holds a reference instead (source, file, SHA-256 of its
weights), checked when a run resumes. It runs in eval mode, without gradients, in float32
or bfloat16, on each rank (DDP) on its own. The loss terms go through
`QATModule.loss_hooks`:

    kd       = r(t) * weight * T^2 * KL(teacher || student)            (qat.distill.logits.kd_logit_loss)
    feature  = r(t) * feature_weight * sum of feature losses            (student -> teacher layers)
    relation = r(t) * relation_weight * in-batch pairwise-cosine MSE    (task 'embedding' only;
               qat.distill.embedding.embedding_relation_loss; logged as its own term)
    bank     = r(t) * bank_weight * neighbourhood loss against the teacher's embeddings of every
               training sentence (task 'embedding' only; qat.distill.bank; built at the term's first
               step from the data module's training set, in order, and never checkpointed: the same
               teacher and data give the same bank on resume)
    r(t)     = min(1, (t - start + 1) / ramp_steps)  (1 without a ramp), 0 before start

`task_weight: 0` trains on the distillation terms alone (labels-free).

Example:
    >>> callback = Distillation(DistillConfig(enabled=True, teacher="warmup"), run_dir, available_from=230)
    >>> pl.Trainer(callbacks=[schedule, callback]).fit(module, datamodule=dm)
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import safetensors.torch
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from qat.distill import (
    FeatureTaps,
    embedding_cosine_loss,
    embedding_mse_loss,
    embedding_relation_loss,
    feature_loss,
    kd_logit_loss,
    token_kd_loss,
)
from qat.distill.bank import bank_relation_loss, teacher_bank
from qat.recipe import DistillConfig
from qat.swap import unprepare
from qat.tasks import Task, make_task, move_batch

TEACHER_FILE = "teacher.safetensors"
BANK_BATCH_SIZE = 64  # sentences per teacher forward while the bank is built


def _device_of(inputs: Any) -> Optional[torch.device]:
    if isinstance(inputs, Tensor):
        return inputs.device
    if isinstance(inputs, dict):
        return next((v.device for v in inputs.values() if isinstance(v, Tensor)), None)
    return None


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
        teacher: the teacher for 'initial' and path sources (see `qat.run.build`); None for 'warmup'.
        available_from: the step the 'warmup' teacher is taken at (the end of FP warm-up).
    """

    def __init__(self, config: DistillConfig, run_dir: Optional[str | Path] = None,
                 teacher: Optional[nn.Module] = None, available_from: int = 0) -> None:
        if teacher is None and config.teacher != "warmup":
            raise ValueError(f"distill.teacher={config.teacher!r} needs a teacher model (see qat.run.build)")
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
        self.bank: Optional[Tensor] = None  # (N, H) teacher embeddings of the training sentences (bank_weight > 0)
        self.task: Task = make_task("classification")  # the LightningModule's, from setup on
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
    def teacher_logits(self, inputs: Any) -> Tensor:
        """The teacher's output for `inputs` (floating tensors cast to its dtype), through the task."""
        parameter = next(self.teacher.parameters(), None)
        device = _device_of(inputs)
        if parameter is not None and device is not None and parameter.device != device:
            self.teacher.to(device)
        if parameter is not None and isinstance(inputs, Tensor) and inputs.is_floating_point():
            inputs = inputs.to(parameter.dtype)
        return self.task.forward(self.teacher, inputs).float()

    def output_loss(self, output: Tensor, teacher: Tensor, inputs: Any) -> Tensor:
        """KL at temperature T for logits (padding masked for token batches), or the embedding loss."""
        c = self.config
        if self.task.name == "embedding":
            return embedding_cosine_loss(output, teacher) if c.embedding_loss == "cosine" else \
                embedding_mse_loss(output, teacher)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if output.dim() == 3:
            return token_kd_loss(output, teacher, mask, c.temperature)
        return kd_logit_loss(output, teacher, c.temperature)

    def loss_terms(self, inputs: Any, output: Tensor, targets: Any) -> dict[str, Tensor]:
        """The weighted distillation terms for one training batch (a `QATModule` loss hook)."""
        ramp = self.ramp(self._trainer.global_step if self._trainer is not None else self.start)
        if ramp == 0.0:
            return {}
        c = self.config
        teacher = self.teacher_logits(inputs)
        terms = {"kd": (ramp * c.weight) * self.output_loss(output, teacher, inputs)}
        if c.relation_weight > 0:
            terms["relation"] = (ramp * c.relation_weight) * embedding_relation_loss(output, teacher)
        if c.bank_weight > 0:
            bank = self._bank(output.device)
            loss = bank_relation_loss(output, teacher, bank, c.bank_loss, c.bank_temperature, c.bank_top_k)
            terms["bank"] = (ramp * c.bank_weight) * loss
        if c.features:
            loss = feature_loss(self._student_taps, self._teacher_taps, c.features, c.feature_loss)
            terms["feature"] = (ramp * c.feature_weight) * loss
            self._student_taps.clear()
            self._teacher_taps.clear()
        return terms

    def _bank(self, device: torch.device) -> Tensor:
        """The teacher bank, built on first use from the training set in order (no shuffling); a training
        dataset that wraps another as `source` (token dropout) gives the bank of its clean sentences."""
        if self.bank is None:
            datamodule = self._trainer.datamodule if self._trainer is not None else None
            if datamodule is None:
                raise RuntimeError("distill.bank_weight needs the Trainer to be given a LightningDataModule")
            loader = datamodule.train_dataloader()
            dataset = getattr(loader.dataset, "source", loader.dataset)  # the clean sentences under an augmentation
            ordered = DataLoader(dataset, batch_size=BANK_BATCH_SIZE, shuffle=False,
                                 collate_fn=loader.collate_fn)
            started = time.perf_counter()
            self.bank = teacher_bank(lambda batch: self.teacher_logits(move_batch(batch, device)), ordered)
            rank_zero_info(f"distillation bank: teacher embeddings of {self.bank.shape[0]} training sentences "
                           f"in {time.perf_counter() - started:.1f} s")
        return self.bank

    # ---- hooks --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.task = pl_module.task_spec
        for key in ("relation_weight", "bank_weight"):
            if getattr(self.config, key) > 0 and self.task.name != "embedding":
                raise ValueError(f"distill.{key}={getattr(self.config, key)} compares sentence embeddings: "
                                 f"it needs task 'embedding', not {self.task.name!r} (set it to 0)")
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
