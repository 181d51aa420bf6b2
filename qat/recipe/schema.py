"""The recipe schema: typed dataclasses (omegaconf structured configs) for a whole training run.

Every section of a recipe YAML file is one dataclass here; each checks its own values in
`__post_init__`, and each field is documented by the string under it. The choice lists come
from the code that implements each choice (tasks from `qat.tasks`, distillation losses from
`qat.distill`, pruning methods from `qat.prune`), so a new choice is added in one place. The
quantization section is `qat.config.QuantSpec`, the core's own spec. `qat.recipe.loading`
reads YAML into these classes.
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
    """Where a Hugging Face model comes from (`model.hf`; loaded by `qat.hf.load`, nothing downloaded)."""

    path: str = "???"
    """Required: a local folder holding config.json and the weights, or `pkg:NAME[/sub]`, a folder inside
    the installed Python package NAME (found without importing it)."""
    gguf_file: Optional[str] = None
    """A GGUF file name inside `path`: transformers dequantizes it to float once, and the result is cached
    as safetensors under `$QAT_CACHE` (default ~/.cache/qat). None: `path` is a Hugging Face model folder."""
    kind: str = "causal_lm"
    """'causal_lm' (AutoModelForCausalLM: logits) or 'encoder' (AutoModel: hidden states)."""
    dtype: str = "float32"
    """The dtype of the loaded weights: 'float32', 'bfloat16' or 'float16'."""
    tokenizer: Optional[str] = None
    """The tokenizer's folder when it is not `path` (same spelling as `path`); None: the model's own
    folder (for a GGUF file, its cached conversion)."""
    config: Dict[str, Any] = field(default_factory=dict)
    """Settings that replace the model config's, e.g. `{hidden_dropout_prob: 0.0}`; a key the model's
    config does not have is an error. Dropout is on in training mode; distilling a quantized copy of a
    pretrained model usually wants it off."""

    def __post_init__(self) -> None:
        if self.kind not in HF_KINDS:
            raise ConfigError(f"model.hf.kind={self.kind!r} is not valid; allowed: {', '.join(map(repr, HF_KINDS))}")
        if self.dtype not in HF_DTYPES:
            raise ConfigError(f"model.hf.dtype={self.dtype!r} is not valid; allowed: {', '.join(map(repr, HF_DTYPES))}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TargetConfig:
    """An object built by import path: `_target_` called with the keyword arguments `args`."""

    _target_: str = "???"
    """Required: the import path of a class or function, `pkg.module.Name` (or `pkg.module.Class.method`)."""
    args: Dict[str, Any] = field(default_factory=dict)
    """The keyword arguments `_target_` is called with."""


@dataclass
class ModelConfig:
    """The model: a class or function by import path, or a pretrained Hugging Face model (`hf`).
    Neither set: the default `qat.models.DigitsCNN`."""

    _target_: Optional[str] = None
    """The import path of a class or function returning the float nn.Module, called with `args`.
    None (and no `hf`): `qat.models.DigitsCNN`. Not together with `hf`."""
    args: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `_target_` (a Hugging Face model takes `hf.*` settings instead). `classes` also
    gives the classification metrics their class count when the data module has no `num_classes`
    (default 10)."""
    hf: Optional[HFSource] = None
    """A pretrained Hugging Face model (`HFSource`: folder, `pkg:` package folder or GGUF file); None:
    the model comes from `_target_`."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them (less memory, more compute): Hugging Face
    models' switch (non-reentrant; it also turns the model's KV cache off). Ignored for a `_target_` model."""

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
    """When quantization happens, in optimizer steps (`qat.lightning.schedule.QuantizationSchedule`):
    FP warm-up, calibration, fake-quant on, freezing. GPTQ rounding follows Frantar et al. 2022
    (`qat.ptq.gptq`)."""

    warmup_steps: int = 0
    """Optimizer steps trained in float (fake-quant off) before calibration; 0: quantized from the first
    step. The 'warmup' distillation teacher and `float.safetensors` (the float reference of `qat eval`,
    for a model that is not pretrained) are taken at this step. >= 0."""
    calibration_batches: int = 8
    """Training batches that initialize observers and scales at the end of warm-up (the weights' ranges
    come from their warmed-up values); fake-quant goes on after them (weights, and activations unless
    `activation_start_step` is later). GPTQ rounds on the same batches. >= 0."""
    activation_start_step: Optional[int] = None
    """The step activation fake-quant goes on, when it is later than the end of warm-up (activations are
    calibrated with the weights either way); None: with the weights."""
    freeze_step: Optional[int] = None
    """The step from which scales, zero points and observers stop changing; 0 keeps them as calibration
    (or GPTQ) chose them, so only the weights train. None: never frozen."""
    freeze_bn_step: Optional[int] = None
    """The step from which BatchNorm layers stay in eval mode (their running statistics stop updating);
    None: never."""
    weight_rounding: str = "nearest"
    """'nearest' (weights start as round-to-nearest with the ranges of `quant.weight.init`) or 'gptq':
    after calibration the Linear weights are GPTQ-rounded on the calibration batches (`qat.ptq`; each
    group's range still from `init`) and replaced by GPTQ's updated weights, so training starts from
    GPTQ's codes. Embedding and Conv2d layers keep round-to-nearest."""
    gptq_damping: float = 0.01
    """GPTQ's damping: this times the mean diagonal of X^T X is added to its diagonal (the paper's 1%);
    in (0, 1]."""
    gptq_act_order: bool = False
    """GPTQ takes the columns by decreasing input energy (the diagonal of X^T X), with each group's range
    fixed from the original weight (`qat.ptq.gptq`); needs `weight_rounding: gptq`."""

    def __post_init__(self) -> None:
        _choice("schedule.weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if self.gptq_act_order and self.weight_rounding != "gptq":
            raise ConfigError(f"schedule.gptq_act_order=true needs schedule.weight_rounding='gptq' "
                              f"(it is {self.weight_rounding!r})")
        if not 0 < self.gptq_damping <= 1:
            raise ConfigError(f"schedule.gptq_damping={self.gptq_damping} is not valid; allowed: (0, 1]")


@dataclass
class OptimizerConfig:
    """The optimizer and its learning-rate schedule (`QATModule.configure_optimizers`). Three parameter
    groups: weight matrices and kernels (weight decay), biases and norms (none), and quantizer scales and
    zero points (own learning rate, no weight decay)."""

    name: str = "adamw"
    """'adamw', 'adam' or 'sgd' (with `momentum`)."""
    lr: float = 1e-3
    """Peak learning rate of the model's weights, biases and norms (quantizer scales use `quantizer_lr`
    when set); > 0."""
    weight_decay: float = 0.01
    """Weight decay of the parameters with 2 or more dimensions (weight matrices, kernels, embedding
    tables); biases, norms and quantizer parameters get none. Decoupled for 'adamw', an L2 term in the
    gradient for 'adam' and 'sgd'."""
    momentum: float = 0.9
    """SGD's momentum (used by 'sgd' only)."""
    quantizer_lr: Optional[float] = None
    """Peak learning rate of the quantizer scales and zero points; None (or 0): `lr`."""
    schedule: str = "cosine"
    """The learning rate after `lr_warmup_steps`: 'cosine' decays it to `min_lr_ratio` * lr at the last
    step (the trainer's estimate of the run's optimizer steps), 'constant' keeps it."""
    lr_warmup_steps: int = 0
    """Optimizer steps over which the learning rate rises linearly to its peak (step k: (k + 1) / N of
    it); 0: no warm-up. Not `schedule.warmup_steps`, the float warm-up."""
    min_lr_ratio: float = 0.0
    """Where 'cosine' ends, as a fraction of each group's peak learning rate; 0: decays to 0."""


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets (see README for DDP / FSDP on N GPUs)."""

    max_epochs: int = 10
    """Epochs at most; training stops at `max_epochs` or `max_steps`, whichever comes first."""
    max_steps: int = -1
    """Optimizer steps at most; -1: no limit (`max_epochs` decides)."""
    accelerator: str = "cpu"
    """Lightning's accelerator: 'cpu', 'gpu', 'cuda', 'auto', ..."""
    devices: int = 1
    """Devices (one process each) to train on."""
    strategy: str = "auto"
    """Lightning's strategy: 'auto', 'ddp' (quantizer scales may take no part in the loss: during FP
    warm-up and once frozen), or 'fsdp2' (sharded, `qat.lightning.sharding`; export its checkpoint
    after the run with `qat export`, not `export.enabled`). 'fsdp' (FSDP1) is refused."""
    precision: str = "32-true"
    """Lightning's precision, e.g. '32-true' or 'bf16-mixed'."""
    seed: int = 0
    """Seed of every RNG (`pl.seed_everything`, data-loader workers too)."""
    gradient_clip_val: Optional[float] = None
    """Clip the gradients' norm to this value; None: no clipping."""
    log_every_n_steps: int = 10
    """Training metrics are logged every this many steps."""
    checkpoint_every_n_steps: Optional[int] = None
    """Write `checkpoints/last.ckpt` every this many optimizer steps; None: Lightning's default (at the
    end of each epoch). `checkpoints/best.ckpt` follows the task's validation metric either way."""
    limit_train_batches: Optional[float] = None
    """Training batches per epoch: a fraction of them (up to 1.0) or a whole number of batches (above 1);
    None: all."""
    limit_val_batches: Optional[float] = None
    """Validation batches per evaluation, as `limit_train_batches`; None: all."""
    deterministic: bool = True
    """Lightning's deterministic: torch's deterministic algorithms, for reproducible runs."""
    accumulate_grad_batches: int = 1
    """Batches whose gradients make one optimizer step (every step count of the recipe is in optimizer
    steps)."""
    val_check_interval: Optional[float] = None
    """How often validation runs: a fraction of a training epoch (up to 1.0) or every this many training
    batches (above 1); None: at the end of each epoch."""
    cpu_threads: Optional[int] = None
    """torch's intra-op threads in this process (`torch.set_num_threads`), >= 1; None keeps torch's default
    (one per core). A small model is faster on 1: splitting its tiny matmuls costs more than it saves,
    and far more on a machine whose cores are busy with other work."""

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"trainer.cpu_threads={self.cpu_threads} must be >= 1, or null for torch's default")


@dataclass
class LoggingConfig:
    """Where a run writes: `run_dir/name/version_N/` holds recipe.yaml, checkpoints/, metrics.csv, wandb/
    and summary.json."""

    run_dir: str = "runs"
    """The folder of all runs; a new run writes to `run_dir/<name>/version_N/`, N the next free number."""
    name: Optional[str] = None
    """The run's folder under `run_dir` and its wandb name; None: the recipe's `name`."""
    wandb: str = "offline"
    """'offline' (written under the run directory for a later `wandb sync`), 'online' or 'disabled'.
    metrics.csv is written in every mode; a wandb logger that fails to start leaves the run on CSV alone,
    with a warning."""
    wandb_project: str = "qat"
    """The wandb project."""
    telemetry_every_n_steps: int = 50
    """Per-layer weight telemetry (SQNR, clipped fraction, scale drift; `qat.lightning.telemetry`) is
    logged every this many optimizer steps; 0: off."""
    progress_bar: bool = True
    """Show Rich's progress bar."""


@dataclass
class ExportConfig:
    """Export an int4 checkpoint at the end of the run (see docs/FORMAT.md)."""

    enabled: bool = False
    """When training ends (and quantization has started), write the int4 file (pruning masks baked in),
    load it back with `qat.load` and add its validation figures to summary.json. Not with
    `trainer.strategy: fsdp2` (export its checkpoint with `qat export` instead)."""
    path: Optional[str] = None
    """Where the file is written; None: `model.safetensors` in the run directory."""


@dataclass
class ReportConfig:
    """The evaluation report written into the run directory at the end of a run (see qat.eval): float,
    PTQ, QAT and the int4 file side by side (report.md, report.json and plots)."""

    enabled: bool = False
    """Write the report when training ends (and quantization has started). It needs the float reference:
    `float.safetensors` from the end of warm-up, or the pretrained model of `model.hf`."""
    noise_levels: Optional[List[float]] = None
    """Robustness levels: Gaussian noise sigmas for float inputs, shares of tokens substituted (and
    dropped, where the data module has a drop token) for token inputs; None: by input kind
    (`qat.eval.robustness.default_levels`)."""
    robustness_examples: Optional[int] = None
    """Measure robustness (noise, photometric shifts) on the first batches holding this many examples of the
    evaluation split (each level is a pass of every model over them); None: all of it."""
    latency: bool = True
    """Also time the int4 model against float on the CPU (one input row, and one validation batch)."""
    budget_bits: Optional[float] = None
    """Also rank the layers by sensitivity and suggest per-layer weight bits whose average, weighted by
    the layers' weights, stays under this many bits, with the quant rules that apply them; None: no
    sensitivity analysis. Not for task 'embedding'."""
    adversarial_eps: Optional[List[float]] = None
    """Image classifiers: accuracy of float, PTQ, QAT and the int4 file under white-box L-inf FGSM and PGD
    attacks of these sizes, and under those crafted on float (transfer); in the model's input units (digits:
    1/16 is one grey level; images fed as (pixel - 127) / 128: 1/128 is one). None or []: not measured. Cost:
    (1 + adversarial_steps) forward + backward passes per eps and stage over adversarial_examples."""
    adversarial_examples: Optional[int] = 512
    """Attack the first this many examples of the evaluation split; None: all of it."""
    adversarial_steps: int = 10
    """PGD steps (step size 2.5 * eps / steps, random start in the eps-ball)."""

    def __post_init__(self) -> None:
        if self.robustness_examples is not None and self.robustness_examples < 1:
            raise ConfigError(f"report.robustness_examples={self.robustness_examples} must be >= 1, or null for all")
        if self.adversarial_examples is not None and self.adversarial_examples < 1:
            raise ConfigError(f"report.adversarial_examples={self.adversarial_examples} must be >= 1, or null for all")
        if self.adversarial_steps < 1:
            raise ConfigError(f"report.adversarial_steps={self.adversarial_steps} must be >= 1")
        if any(eps < 0 for eps in self.adversarial_eps or ()):
            raise ConfigError(f"report.adversarial_eps={self.adversarial_eps}: attack sizes must be >= 0")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (see qat.lightning.distillation). The loss is

        task_weight * task_loss + r(t) * (weight * T^2 * KL(teacher || student, temperature T)
                                          + feature_weight * sum of feature losses
                                          + relation_weight * relation loss + bank_weight * bank loss)

    where r(t) ramps linearly from 0 to 1 over `ramp_steps` steps from `start_step`. For task
    'causal_lm' the KL is per token, padding masked; for task 'embedding' the output term compares
    sentence embeddings (`embedding_loss`) instead.
    """

    enabled: bool = False
    """Add the distillation terms to the training loss."""
    teacher: str = "initial"
    """'initial' (the float model as built, before prepare: a pretrained model), 'warmup' (the float model
    at the end of FP warm-up; saved once to the run directory), or a path: a qat training checkpoint
    (.ckpt), a .safetensors state dict of the recipe's model, or a Hugging Face model directory. A resumed
    run checks that its teacher is the same one (SHA-256 of the weights)."""
    temperature: float = 2.0
    """T: both softmaxes take logits / T, and the KL is multiplied by T^2; > 0. Unused by task 'embedding'."""
    weight: float = 1.0
    """Weight of the output term (the KL, or the embedding loss for task 'embedding'); >= 0."""
    start_step: int = 0
    """The optimizer step the distillation terms start at (for 'warmup', the end of warm-up at the
    earliest); >= 0."""
    ramp_steps: int = 0
    """Steps over which r(t) rises linearly to 1 from the start (1 / ramp_steps at the first); 0: the full
    weight at once. >= 0."""
    task_weight: float = 1.0
    """Weight of the task's own loss; 0 is labels-free training, which needs the teacher from step 0
    (`teacher` not 'warmup', `start_step` 0). >= 0."""
    features: Dict[str, str] = field(default_factory=dict)
    """Maps student layer names to teacher layer names: their outputs are matched too (`feature_loss`);
    empty: no feature term."""
    feature_loss: str = "mse"
    """The loss of each `features` pair: 'mse' or 'cosine'."""
    feature_weight: float = 1.0
    """Weight of the summed feature losses; >= 0."""
    teacher_dtype: str = "float32"
    """'float32', or 'bfloat16' to run the teacher in bf16."""
    embedding_loss: str = "cosine"
    """Task 'embedding': how student and teacher sentence embeddings are compared, 'cosine' (mean of
    1 - cosine) or 'mse'."""
    relation_weight: float = 0.0
    """Task 'embedding' only; 0 = off. Adds r(t) * relation_weight * the mean squared difference of the
    student's and the teacher's in-batch pairwise cosine similarities
    (qat.distill.embedding.embedding_relation_loss), for nearest-neighbour agreement. >= 0."""
    bank_weight: float = 0.0
    """Task 'embedding' only; 0 = off. Adds r(t) * bank_weight * a neighbourhood loss of each student
    embedding against a bank of the teacher's embeddings of every training sentence, built once at the
    start of training (qat.distill.bank.bank_relation_loss; `bank_loss`, `bank_temperature`,
    `bank_top_k`). >= 0."""
    bank_loss: str = "kl"
    """'kl' (softmax of the bank cosines at `bank_temperature`, teacher || student) or 'mse' (the bank
    cosines' squared differences)."""
    bank_temperature: float = 0.05
    """The temperature of the 'kl' bank loss's softmaxes; > 0."""
    bank_top_k: Optional[int] = None
    """Compare over the teacher's `bank_top_k` nearest bank entries of each sentence (>= 1); None: the whole
    bank. The sentence itself is left out either way."""

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
    """Gradual pruning (Zhu & Gupta 2017 cubic schedule, by optimizer step; see qat.prune)."""

    enabled: bool = False
    """Prune the chosen layers during training (`qat.lightning.pruning`)."""
    method: str = "nm"
    """'magnitude' (the smallest |w| of each layer), 'global_magnitude' (the smallest |w| over all pruned
    layers together) or 'nm' (`n`:`m` along the input dimension; final sparsity (m-n)/m)."""
    sparsity: Optional[float] = None
    """The final sparsity, reached at `end_step`: in [0, 1), at most (m-n)/m for 'nm'. None: (m-n)/m for
    'nm'; required for the other methods."""
    n: int = 2
    """'nm': weights kept in every run of `m` consecutive inputs; 1 <= n < m."""
    m: int = 4
    """'nm': the run length; layers whose input dimension is not a multiple of it stay dense."""
    initial_sparsity: float = 0.0
    """The sparsity at `start_step`, in [0, sparsity]."""
    start_step: int = 0
    """The optimizer step pruning starts at (no pruning before it); >= 0."""
    end_step: int = 0
    """The step the final sparsity is reached at; at or before `start_step`: the final sparsity at once.
    >= 0."""
    frequency: int = 10
    """The masks are updated every this many steps between `start_step` and `end_step`; >= 1."""
    layers: List[str] = field(default_factory=list)
    """Regexes of the layer names to prune (matching the whole name); empty: every Linear and Conv2d."""
    exclude: List[str] = field(default_factory=list)
    """Regexes of layer names left dense. A layer whose weight is tied to another's stays dense too."""

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
    """A whole QAT run: one field per section of a recipe YAML file."""

    name: str = "run"
    """The run's name: its folder under `logging.run_dir` and its wandb name (unless `logging.name` is
    set), and the title of its summary and report."""
    task: str = "classification"
    """What the model is trained and measured on (`qat.tasks`): 'classification' (accuracy),
    'language_model' ((tokens, shifted targets) batches; perplexity), 'causal_lm' (dict batches of a
    causal LM; next-token loss, perplexity) or 'embedding' (sentence embeddings of an encoder, measured
    against the float model; no task loss of its own, so it trains by distillation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The float model to quantize."""
    data: TargetConfig = field(default_factory=lambda: TargetConfig(_target_="qat.data.DigitsDataModule"))
    """The LightningDataModule, by import path and arguments. With `model.hf`, the model's tokenizer and
    its `max_positions` / `vocab_size` are passed too, to a data module that takes them and whose `args`
    do not set them."""
    quant: QuantSpec = field(default_factory=QuantSpec)
    """What is quantized, and how (`qat.config.QuantSpec`). A resumed run must have the checkpoint's."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """When quantization happens."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer and its learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning's Trainer settings."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where the run writes, and what it logs."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """The int4 file at the end of the run."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation from a frozen teacher."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Gradual pruning."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """The evaluation report at the end of the run."""
    resume: Optional[str] = None
    """None: a new run (the next `version_N`); 'last': continue from the newest
    `version_*/checkpoints/last.ckpt` of this run's folder; otherwise the path of a checkpoint file. A
    resumed run writes into the checkpoint's run directory."""

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
