"""Send an evaluation report to a run's loggers (end of a run with `report.enabled`).

    every logger            the stage metrics as scalars `eval/<stage>/<metric>` and the
                            "% of the PTQ gap recovered" as `eval/gap_recovered/<stage>/<metric>`
    loggers taking media    (wandb) also the stages table `eval/stages` and each PNG plot as
                            `eval/plots/<name>` (layers, reliability, slices, robustness, size)

Media go to a logger that has `log_image` and `log_table` (Lightning's WandbLogger, also
inside qat's `FailSafeLogger`); the CSV logger gets the scalars only. A wandb failure here
is never fatal: the fail-safe wrapper warns once and drops wandb; the report files are
written before anything is logged.

Example:
    >>> log_report(run.trainer.loggers, report, plots, step=run.trainer.global_step)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from qat.eval.report import STAGE_LABELS, stage_columns

TABLE_KEY = "eval/stages"
PLOT_PREFIX = "eval/plots/"


def scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's finite numbers per stage, and its gap-recovered figures, as flat logger keys."""
    flat = {f"eval/{stage}/{key}": float(value) for stage, row in report["stages"].items()
            for key, value in row.items() if _is_number(value)}
    flat.update({f"eval/gap_recovered/{stage}/{key}": float(value)
                 for stage, gaps in report.get("gap_recovered", {}).items() for key, value in gaps.items()
                 if _is_number(value)})
    return flat


def stages_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the report's main table: one row per stage, as in report.md."""
    keys = stage_columns(report)
    rows = [[STAGE_LABELS.get(stage, stage), *(row.get(key) for key in keys)]
            for stage, row in report["stages"].items()]
    return ["stage", *keys], rows


def takes_media(logger: Any) -> bool:
    """True for a logger that logs images and tables (wandb), looking inside a `FailSafeLogger`."""
    inner = getattr(logger, "inner", logger)
    return inner is not None and hasattr(inner, "log_image") and hasattr(inner, "log_table")


def log_report(loggers: Sequence[Any], report: dict[str, Any], plots: Mapping[str, Path], step: int) -> None:
    """Scalars to every logger; the stages table and the plots to those that take media."""
    values = scalars(report)
    columns, rows = stages_table(report)
    for logger in loggers:
        logger.log_metrics(values, step=step)
        if takes_media(logger):
            logger.log_table(TABLE_KEY, columns=columns, data=rows, step=step)
            for name, path in plots.items():
                if takes_media(logger):  # a failed call above drops a fail-safe logger's wandb
                    logger.log_image(f"{PLOT_PREFIX}{name}", [str(path)], step=step, caption=[Path(path).name])
        logger.save()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
