"""A run prints none of Lightning's start-up notices, its pytree deprecation or wandb's 'anonymous'
warning, and every other message still gets through: each is filtered at its source, by its text."""

from __future__ import annotations

import logging
import warnings

from pytorch_lightning.utilities import rank_zero_info

from qat.cli import main
from qat.lightning.loggers import make_wandb_logger, quiet_lightning_notices
from tests.qat.run.helpers import FAST

NOISE = ("GPU available:", "TPU available:", "💡 Tip:", "Loading `train_dataloader`", "LeafSpec", "anonymous")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_lightnings_notices_are_dropped_from_its_rank_zero_lines():
    quiet_lightning_notices()
    quiet_lightning_notices()  # idempotent: one filter
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert len(logger.filters) == len({type(f) for f in logger.filters})
    collect = Collect()
    logger.addHandler(collect)
    try:
        for message in ("GPU available: False, used: False", "TPU available: False, using: 0 TPU cores",
                        "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
                        "`Trainer.fit` stopped: `max_steps=3` reached."):
            rank_zero_info(message)
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["`Trainer.fit` stopped: `max_steps=3` reached."]


def test_the_pytree_deprecation_is_dropped_by_message_and_module_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning_notices()
        where = {"filename": "_pytree.py", "lineno": 21, "module": "pytorch_lightning.utilities._pytree"}
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, **where)
        warnings.warn_explicit("another deprecation", FutureWarning, **where)
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "mine.py", 1, module="my_code")
    assert [(str(w.message).split(",")[0], w.filename) for w in caught] == [
        ("another deprecation", "_pytree.py"), ("`isinstance(treespec", "mine.py")]


def test_the_wandb_logger_does_not_pass_the_deprecated_anonymous_setting(tmp_path):
    logger = make_wandb_logger(tmp_path, "offline", "qat-test", "quiet")
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["name"] == "quiet"


def test_a_training_run_prints_none_of_the_noise(tmp_path, capfd):
    argv = ["train", "recipes/digits_w4a4.yaml", *FAST, "logging.wandb=offline", f"logging.run_dir={tmp_path}",
            "trainer.max_steps=11"]
    assert main(argv) == 0
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "QAT" in text  # the run's own summary table
    assert [noise for noise in NOISE if noise in text] == []


def test_a_run_that_stops_before_its_first_validation_does_not_warn_about_the_best_checkpoints_metric(tmp_path):
    # digits: 12 training batches of 128 an epoch; 11 steps end the run before the epoch's validation
    argv = ["train", "recipes/digits_w4a4.yaml", *FAST, f"logging.run_dir={tmp_path}", "trainer.max_steps=11"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert [str(w.message)[:80] for w in caught if "could not find the monitored key" in str(w.message)] == []
    assert not (next(tmp_path.rglob("checkpoints")) / "best.ckpt").exists()  # nothing to rank: none written
