"""Run logging: CSV always; wandb offline by default, and never fatal.

`FailSafeLogger` wraps another Lightning logger: the first exception from it (at
start-up or while logging) is reported once as a warning and the wrapped logger is
dropped, so training carries on with the CSV log. wandb 'offline' needs no network;
`wandb sync <run_dir>/wandb/offline-run-*` uploads later.

Example:
    >>> loggers = make_loggers(run_dir, wandb_mode="offline", project="qat", name="digits")
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities import rank_zero_only


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


def make_loggers(run_dir: Path, wandb_mode: str, project: str, name: str) -> list[Logger]:
    """CSV logger writing `run_dir/metrics.csv`, plus a fail-safe wandb logger unless disabled."""
    quiet_lightning_notices()
    # The run directory already holds recipe.yaml: Lightning's "directory not empty" warning is noise here.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
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
