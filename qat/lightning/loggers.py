"""Run logging: CSV always; wandb offline by default, and never fatal.

`RunCSVLogger` writes `<run_dir>/metrics.csv` and, on resume, continues it: the rows of the steps
the checkpoint holds are kept, the ones logged after it are dropped (those steps run again), and
rows are written as they are logged, so a killed run loses none of the steps it checkpointed.

`FailSafeLogger` wraps another Lightning logger: the first exception from it (at
start-up or while logging) is reported once as a warning and the wrapped logger is
dropped, so training carries on with the CSV log. wandb 'offline' needs no network;
`wandb sync <run_dir>/wandb/offline-run-*` uploads later.

Example:
    >>> loggers = make_loggers(run_dir, wandb_mode="offline", project="qat", name="digits")
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only


class _ContinuedMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing metrics.csv is continued instead of deleted: rows whose
    step is below `resume_step` are kept (with their header, which grows if new columns appear);
    a new run (`resume_step` None) starts an empty file, as Lightning's does."""

    def __init__(self, log_dir: str, resume_step: Optional[int]) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by Lightning's __init__, in place of its delete
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resume_step is None:
            path.unlink()  # a new run's file starts empty (only a relaunched rank could find one)
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            # Lightning logs the metrics of optimizer step k + 1 at step k: below the checkpoint's global
            # step they came from steps it holds; from it on, the resumed run logs them again.
            kept = [row for row in reader if row.get("step") and float(row["step"]) < self.resume_step]
        tmp = path.with_name(f".{path.name}.tmp")  # replaced in one rename: the history is never half-written
        with tmp.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)
        self.metrics_keys = header  # new columns rewrite the file with the wider header (Lightning's save)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<run_dir>/metrics.csv`, continued on resume (see `_ContinuedMetricsWriter`).
    Rows are flushed as they are logged (Lightning buffers 100 steps): after a SIGKILL, `resume=last`
    would otherwise find a history that stops up to 100 steps before its checkpoint."""

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetricsWriter(self.log_dir, self.resume_step)
        return self._experiment


class ResumedLogStep(pl.Callback):
    """Keeps the step a resumed run logs at equal to its optimizer steps. Lightning (2.6) counts one
    stepped batch too many when it resumes from a checkpoint written at the end of an epoch (the first
    loop iteration only skips the validation already done, yet is counted), so every row the resumed
    run logs would carry the next step's number. At the start of a batch the count is, by Lightning's
    own definition, the optimizer steps done (one optimizer, automatic optimization: qat's module)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


class FailSafeLogger(Logger):
    """Delegates to `inner`; any exception disables it with one warning instead of stopping the run."""

    def __init__(self, inner: Logger, label: str) -> None:
        super().__init__()
        self.inner: Optional[Logger] = inner
        self.label = label

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.inner is None:
            return None
        try:
            return getattr(self.inner, method)(*args, **kwargs)
        except Exception as err:
            self._disable(err)
            return None

    def _disable(self, err: Exception) -> None:
        warnings.warn(f"{self.label} logging failed and is now off ({type(err).__name__}: {err}); "
                      "training continues with the CSV log", stacklevel=3)
        self.inner = None

    @property
    def name(self) -> str:
        return self.label

    @property
    def version(self) -> str:
        return ""

    @property
    def experiment(self) -> Any:
        if self.inner is None:
            return None
        try:
            return self.inner.experiment
        except Exception as err:
            self._disable(err)
            return None

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self._call("log_metrics", metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._call("log_hyperparams", params, *args, **kwargs)

    @rank_zero_only
    def log_image(self, key: str, images: list, step: Optional[int] = None, **kwargs: Any) -> None:
        """Images (file paths or arrays) under `key`, when the wrapped logger takes images (wandb)."""
        self._call("log_image", key, images, step, **kwargs)

    @rank_zero_only
    def log_table(self, key: str, columns: Optional[list[str]] = None, data: Optional[list[list[Any]]] = None,
                  step: Optional[int] = None) -> None:
        """A table under `key`, when the wrapped logger takes tables (wandb)."""
        self._call("log_table", key, columns=columns, data=data, step=step)

    def save(self) -> None:
        self._call("save")

    def finalize(self, status: str) -> None:
        self._call("finalize", status)

    def close(self) -> None:
        """Finish the wrapped logger's run, if it started one. Lightning's finalize leaves a wandb run open
        until the process exits, and a later WandbLogger in the same process (a sweep, a notebook, a test
        session) would log into it instead of starting its own. Called once the run's report is logged."""
        run = getattr(self.inner, "_experiment", None)
        if run is not None and callable(getattr(run, "finish", None)):
            try:
                run.finish()
            except Exception as err:
                self._disable(err)


def close_loggers(loggers: list[Logger]) -> None:
    """Finish every fail-safe logger's run (see FailSafeLogger.close)."""
    for logger in loggers:
        if isinstance(logger, FailSafeLogger):
            logger.close()


def make_wandb_logger(run_dir: Path, mode: str, project: str, name: str) -> Logger:
    """A WandbLogger writing under `run_dir/wandb` ('offline' or 'online')."""
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(project=project, name=name, save_dir=str(run_dir), offline=(mode == "offline"),
                         log_model=False, settings=_wandb_settings())
    # Lightning passes anonymous=None to wandb.init, which then warns that this deprecated setting "has no
    # effect"; left out, wandb uses its default (the same behaviour) and says nothing.
    logger._wandb_init.pop("anonymous", None)
    return logger


def _wandb_settings() -> Any:
    import wandb

    return wandb.Settings(silent=True, console="off", x_disable_stats=True)


def make_loggers(run_dir: Path, wandb_mode: str, project: str, name: str,
                 resume_step: Optional[int] = None) -> list[Logger]:
    """CSV logger writing `run_dir/metrics.csv` (continued from `resume_step`, the resumed checkpoint's
    global step), plus a fail-safe wandb logger unless disabled."""
    quiet_lightning_notices()
    loggers: list[Logger] = [RunCSVLogger(run_dir, resume_step)]
    if wandb_mode != "disabled":
        try:
            inner = make_wandb_logger(run_dir, wandb_mode, project, name)
            loggers.append(FailSafeLogger(inner, "wandb"))
        except Exception as err:
            warnings.warn(f"wandb logging is off ({type(err).__name__}: {err}); training continues with CSV",
                          stacklevel=2)
    return loggers


# Lightning's start-up notices that tell a qat run nothing: which accelerators exist (the recipe's
# trainer.accelerator says which one runs), tips to install its cloud products, and that it loads the
# training data to count the steps of the learning-rate schedule.
LIGHTNING_NOTICES = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:",
                     "Loading `train_dataloader` to estimate number of stepping batches")


class _DropLightningNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_NOTICES)


def quiet_lightning_notices() -> None:
    """Drop LIGHTNING_NOTICES from the logger of Lightning's rank-zero info lines, and the FutureWarning
    that Lightning 2.6's own pytree helper raises in torch on every fit (its use of the deprecated
    `LeafSpec`, nothing qat or a recipe can change). Every other message and warning stays."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(existing, _DropLightningNotices) for existing in logger.filters):
        logger.addFilter(_DropLightningNotices())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"pytorch_lightning\.utilities\._pytree")
