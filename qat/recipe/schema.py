"""The recipe schema: typed dataclasses (omegaconf structured configs) for a whole training run.

Every section of a recipe YAML file is one dataclass here; each checks its own values in
`__post_init__`. The choice lists come from the code that implements each choice (tasks from
`qat.tasks`, distillation losses from `qat.distill`, pruning methods from `qat.prune`), so a
new choice is added in one place. The quantization section is `qat.config.QuantSpec`, the
core's own spec. `qat.recipe.loading` reads YAML into these classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from qat.config import ConfigError, QuantSpec
from qat.distill.bank import BANK_LOSSES
from qat.distill.logits import FEATURE_LOSSES
from qat.prune import METHODS
from qat.tasks import TASKS

WANDB_MODES = ("offline", "online", "disabled")
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")
DEFAULT_MODEL = "qat.models.DigitsCNN"
TEACHER_DTYPES = ("float32", "bfloat16")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
# The Hugging Face loader's choices (qat.hf.load): model classes, and the dtypes of the loaded weights.
HF_KINDS = ("causal_lm", "encoder")
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFSource:
    """Where a Hugging Face model comes from.

    Attributes:
        path: a local folder, or `pkg:NAME[/sub]` (a folder inside an installed package).
        gguf_file: a GGUF file name inside `path` (transformers dequantizes it to float).
        kind: 'causal_lm' (AutoModelForCausalLM) or 'encoder' (AutoModel: hidden states).
        dtype: the dtype of the loaded weights: 'float32', 'bfloat16' or 'float16'.
        tokenizer: the tokenizer's folder when it is not `path` (same spelling as `path`).
        config: settings that replace the model config's, e.g. `{hidden_dropout_prob: 0.0}`
            (dropout is on in training mode; distilling a quantized copy of a pretrained model
            usually wants it off).
    """

    path: str = "???"
    gguf_file: Optional[str] = None
    kind: str = "causal_lm"
    dtype: str = "float32"
    tokenizer: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in HF_KINDS:
            raise ConfigError(f"model.hf.kind={self.kind!r} is not valid; allowed: {', '.join(map(repr, HF_KINDS))}")
        if self.dtype not in HF_DTYPES:
            raise ConfigError(f"model.hf.dtype={self.dtype!r} is not valid; allowed: {', '.join(map(repr, HF_DTYPES))}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TargetConfig:
    """An object built by import path: `_target_` plus keyword arguments `args`."""

    _target_: str = "???"
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The model: a class or function by import path (`_target_` called with `args`), or a
    pretrained Hugging Face model (`hf`: folder, `pkg:` package folder or GGUF file; see
    `qat.hf.HFSource`). Neither set: the default `qat.models.DigitsCNN`.
    `gradient_checkpointing` recomputes activations in backward (Hugging Face models' switch).
    """

    _target_: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)
    hf: Optional[HFSource] = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self._target_ is not None and self.hf is not None:
            raise ConfigError("model: set either model._target_ (a class by import path) or model.hf "
                              "(a Hugging Face model), not both")
        if self.hf is not None and self.args:
            raise ConfigError("model.args go with model._target_; a Hugging Face model takes model.hf.* settings")

    @property
    def target(self) -> str:
        """The import path of the model (the default DigitsCNN when neither `_target_` nor `hf` is set)."""
        return self._target_ or DEFAULT_MODEL


@dataclass
class ScheduleConfig:
    """When quantization happens, in optimizer steps.

    FP warm-up runs `warmup_steps` steps with fake-quant off; then `calibration_batches`
    training batches initialize observers and scales, and fake-quant goes on (weights,
    and activations from `activation_start_step` if later). Scales and observers freeze
    at `freeze_step`, BatchNorm statistics at `freeze_bn_step` (None: never).

    `weight_rounding`: 'nearest' (weights start as round-to-nearest with the ranges of
    `quant.weight.init`) or 'gptq': after calibration the Linear weights are GPTQ-rounded on
    the same batches (`qat.ptq`; each group's range still from `init`, `gptq_damping` times the
    mean diagonal of X^T X added); the weights are replaced by GPTQ's updated weights, so
    training starts from GPTQ's codes. Embedding and Conv2d layers keep round-to-nearest.
    `gptq_act_order`: GPTQ takes the columns by decreasing input energy, with each group's range
    fixed from the original weight (`qat.ptq.gptq`).
    """

    warmup_steps: int = 0
    calibration_batches: int = 8
    activation_start_step: Optional[int] = None
    freeze_step: Optional[int] = None
    freeze_bn_step: Optional[int] = None
    weight_rounding: str = "nearest"
    gptq_damping: float = 0.01
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        _choice("schedule.weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if self.gptq_act_order and self.weight_rounding != "gptq":
            raise ConfigError(f"schedule.gptq_act_order=true needs schedule.weight_rounding='gptq' "
                              f"(it is {self.weight_rounding!r})")
        if not 0 < self.gptq_damping <= 1:
            raise ConfigError(f"schedule.gptq_damping={self.gptq_damping} is not valid; allowed: (0, 1]")


@dataclass
class OptimizerConfig:
    """Optimizer for the model; quantizer scales get their own group (own lr, no weight decay).

    The learning rate warms up linearly over `lr_warmup_steps` optimizer steps, then follows
    `schedule`: 'cosine' decays it to `min_lr_ratio` * lr at the last step, 'constant' keeps it.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    quantizer_lr: Optional[float] = None
    schedule: str = "cosine"
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets (see README for DDP / FSDP on N GPUs). `cpu_threads`: torch's
    intra-op threads in this process (`torch.set_num_threads`); null keeps torch's default (one
    per core). A small model is faster on 1: splitting its tiny matmuls costs more than it saves,
    and far more on a machine whose cores are busy with other work."""

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
    accumulate_grad_batches: int = 1
    val_check_interval: Optional[float] = None
    cpu_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"trainer.cpu_threads={self.cpu_threads} must be >= 1, or null for torch's default")


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
class ReportConfig:
    """The evaluation report written into the run directory at the end of a run (see qat.eval):
    float, PTQ, QAT and the int4 file side by side. `noise_levels` None: by input kind;
    `budget_bits`: also suggest per-layer weight bits under this average."""

    enabled: bool = False
    noise_levels: Optional[List[float]] = None
    latency: bool = True
    budget_bits: Optional[float] = None


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (see qat.lightning.distillation).

    `teacher`: 'initial' (the float model as built, before prepare: a pretrained model),
    'warmup' (the float model at the end of FP warm-up; saved once to the run directory),
    or a path: a qat training checkpoint (.ckpt), a .safetensors state dict of the recipe's
    model, or a Hugging Face model directory. The loss is

        task_weight * task_loss + r(t) * (weight * T^2 * KL(teacher || student, temperature T)
                                          + feature_weight * sum of feature losses)

    where r(t) ramps linearly from 0 to 1 over `ramp_steps` steps from `start_step` (for
    'warmup', from the end of warm-up at the earliest). `task_weight: 0` is labels-free
    training. For task 'causal_lm' the KL is per token, padding masked; for task 'embedding'
    the loss compares sentence embeddings (`embedding_loss` 'cosine' or 'mse'). `features`
    maps student layer names to teacher layer names (`feature_loss` 'mse' or 'cosine');
    `teacher_dtype: bfloat16` runs the teacher in bf16. `relation_weight` (task 'embedding'
    only; 0 = off) adds r(t) * relation_weight * the mean squared difference of the student's
    and the teacher's in-batch pairwise cosine similarities (qat.distill.embedding.embedding_relation_loss),
    for nearest-neighbour agreement. `bank_weight` (task 'embedding' only; 0 = off) adds
    r(t) * bank_weight * a neighbourhood loss of each student embedding against a bank of the teacher's
    embeddings of every training sentence, built once at the start of training
    (qat.distill.bank.bank_relation_loss): `bank_loss` 'kl' (softmax of the bank cosines at
    `bank_temperature`, teacher || student) or 'mse' (the bank cosines' squared differences), over the
    whole bank or the teacher's `bank_top_k` nearest entries (null = all); the sentence itself is left out.
    """

    enabled: bool = False
    teacher: str = "initial"
    temperature: float = 2.0
    weight: float = 1.0
    start_step: int = 0
    ramp_steps: int = 0
    task_weight: float = 1.0
    features: Dict[str, str] = field(default_factory=dict)
    feature_loss: str = "mse"
    feature_weight: float = 1.0
    teacher_dtype: str = "float32"
    embedding_loss: str = "cosine"
    relation_weight: float = 0.0
    bank_weight: float = 0.0
    bank_loss: str = "kl"
    bank_temperature: float = 0.05
    bank_top_k: Optional[int] = None

    def __post_init__(self) -> None:
        _choice("distill.feature_loss", self.feature_loss, tuple(FEATURE_LOSSES))
        _choice("distill.teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        _choice("distill.embedding_loss", self.embedding_loss, tuple(FEATURE_LOSSES))
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")
        _choice("distill.bank_loss", self.bank_loss, BANK_LOSSES)
        if not self.bank_temperature > 0:
            raise ConfigError(f"distill.bank_temperature={self.bank_temperature} must be > 0")
        if self.bank_top_k is not None and self.bank_top_k < 1:
            raise ConfigError(f"distill.bank_top_k={self.bank_top_k} must be >= 1, or null for the whole bank")
        for key in ("weight", "task_weight", "feature_weight", "start_step", "ramp_steps", "relation_weight",
                    "bank_weight"):
            if not getattr(self, key) >= 0:  # NaN fails too
                raise ConfigError(f"distill.{key}={getattr(self, key)} must be >= 0")
        if self.enabled and self.task_weight == 0 and (self.teacher == "warmup" or self.start_step > 0):
            raise ConfigError("distill.task_weight=0 (labels-free) needs the teacher from step 0: "
                              "use distill.teacher other than 'warmup' and distill.start_step=0")


@dataclass
class PruneConfig:
    """Gradual pruning (Zhu & Gupta 2017 cubic schedule, by optimizer step; see qat.prune).

    `method`: 'magnitude' (per layer), 'global_magnitude' or 'nm' (`n`:`m` along the input
    dimension; final sparsity (m-n)/m). Sparsity goes from `initial_sparsity` at
    `start_step` to `sparsity` (None: (m-n)/m for 'nm') at `end_step`, updated every
    `frequency` steps. `layers` / `exclude`: regexes of layer names (no `layers`: every
    Linear and Conv2d).
    """

    enabled: bool = False
    method: str = "nm"
    sparsity: Optional[float] = None
    n: int = 2
    m: int = 4
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 0
    frequency: int = 10
    layers: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice("prune.method", self.method, METHODS)
        if not 1 <= self.n < self.m:
            raise ConfigError(f"prune.n={self.n}, prune.m={self.m}: need 1 <= n < m")
        limit = (self.m - self.n) / self.m if self.method == "nm" else 1.0
        if self.sparsity is None and self.method != "nm" and self.enabled:
            raise ConfigError(f"prune.sparsity is required for prune.method={self.method!r}")
        final = self.final_sparsity
        if not 0 <= final < 1 or final > limit:
            raise ConfigError(f"prune.sparsity={final} must be in [0, 1) and <= {limit:g} for {self.method}")
        if not 0 <= self.initial_sparsity <= final:
            raise ConfigError(f"prune.initial_sparsity={self.initial_sparsity} must be in [0, prune.sparsity]")
        if self.start_step < 0 or self.end_step < 0 or self.frequency < 1:
            raise ConfigError("prune.start_step and prune.end_step must be >= 0 and prune.frequency >= 1")

    @property
    def final_sparsity(self) -> float:
        """`sparsity`, or (m - n) / m when it is None."""
        return (self.m - self.n) / self.m if self.sparsity is None else self.sparsity


@dataclass
class Recipe:
    """A whole QAT run. Every field is documented in the dataclass it belongs to."""

    name: str = "run"
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TargetConfig = field(default_factory=lambda: TargetConfig(_target_="qat.data.DigitsDataModule"))
    quant: QuantSpec = field(default_factory=QuantSpec)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    resume: Optional[str] = None

    def __post_init__(self) -> None:
        _choice("task", self.task, tuple(TASKS))
        _choice("logging.wandb", self.logging.wandb, WANDB_MODES)
        _choice("optimizer.name", self.optimizer.name, OPTIMIZERS)
        _choice("optimizer.schedule", self.optimizer.schedule, LR_SCHEDULES)
        for key, value in (("schedule.warmup_steps", self.schedule.warmup_steps),
                           ("schedule.calibration_batches", self.schedule.calibration_batches)):
            if value < 0:
                raise ConfigError(f"{key}={value} must be >= 0")
        if self.optimizer.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.optimizer.lr} must be > 0")
        for key in ("relation_weight", "bank_weight"):
            value = getattr(self.distill, key)
            if self.distill.enabled and value > 0 and self.task != "embedding":
                raise ConfigError(f"distill.{key}={value} compares sentence embeddings: "
                                  f"it needs task 'embedding', not {self.task!r} (set it to 0)")


def _choice(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed: {', '.join(map(repr, allowed))}")
