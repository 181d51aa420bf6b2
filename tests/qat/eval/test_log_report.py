"""The report on the run's loggers: scalars everywhere; the stages table and the PNG plots on wandb
(offline, in a temp dir); a failing wandb never breaks the report."""

from __future__ import annotations

import json
import time
import warnings

import pytest
from pytorch_lightning.loggers import CSVLogger

from qat.eval.log_report import log_report, scalars, stages_table, takes_media
from qat.eval.report import write_report
from qat.lightning.loggers import FailSafeLogger, make_wandb_logger
from tests.qat.eval.test_report import toy  # noqa: F401  (the module fixture: float / PTQ / QAT toys and their report)


@pytest.fixture(scope="module")
def written(toy, tmp_path_factory):  # noqa: F811
    _, _, report = toy
    directory = tmp_path_factory.mktemp("report")
    paths = write_report(report, directory)
    return report, {name: path for name, path in paths.items() if name not in ("json", "md")}


def test_scalars_and_table_are_the_reports_own_numbers(written):
    report, _ = written
    flat = scalars(report)
    assert flat["eval/ptq/kl"] == report["stages"]["ptq"]["kl"]
    assert flat["eval/qat/correct_to_wrong"] == report["stages"]["qat"]["correct_to_wrong"]
    gap = report["gap_recovered"]["qat"]["accuracy"]
    assert gap is not None and flat["eval/gap_recovered/qat/accuracy"] == gap
    columns, rows = stages_table(report)
    assert columns[:3] == ["stage", "accuracy", "nll"]
    assert [row[0] for row in rows] == ["float", "PTQ", "QAT"]
    assert rows[1][columns.index("kl")] == report["stages"]["ptq"]["kl"]


def test_csv_gets_the_scalars_and_no_media(written, tmp_path):
    report, plots = written
    csv = CSVLogger(save_dir=str(tmp_path), name="", version="")
    assert not takes_media(csv)
    log_report([csv], report, plots, step=7)
    header, row = (tmp_path / "metrics.csv").read_text().splitlines()[:2]
    assert "eval/ptq/kl" in header.split(",") and "eval/gap_recovered/qat/accuracy" in header.split(",")
    assert row.split(",")[header.split(",").index("step")] == "7"


def test_wandb_offline_run_holds_the_plots_and_the_stages_table(written, tmp_path):
    report, plots = written
    import wandb

    wandb.finish()  # none left open by an earlier test in this process
    logger = FailSafeLogger(make_wandb_logger(tmp_path, "offline", "qat-test", "eval"), "wandb")
    assert takes_media(logger)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fail-safe wrapper would warn on any wandb error
        log_report([logger], report, plots, step=3)
    run = logger.experiment
    run_dir = tmp_path / "wandb"
    run.finish()
    (offline,) = run_dir.glob("offline-run-*")
    images = sorted(p.name for p in (offline / "files" / "media" / "images").rglob("*.png"))
    for name in plots:
        assert any(image.startswith(name) for image in images), (name, images)
    (table,) = (offline / "files" / "media" / "table").rglob("stages*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:2] == ["stage", "accuracy"]
    assert logged["data"][1][1] == pytest.approx(report["stages"]["ptq"]["accuracy"])
    # an offline run keeps its history in the run's record file (protobuf records: key names verbatim),
    # written by wandb's service process, which may still be writing it when finish() returns
    (records,) = offline.glob("run-*.wandb")
    keys = ("eval/ptq/kl", "eval/gap_recovered/qat/accuracy", "eval/stages", *(f"eval/plots/{n}" for n in plots))
    deadline = time.monotonic() + 30
    while not all(key.encode() in records.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    history = records.read_bytes()
    for key in keys:
        assert key.encode() in history, key


class BrokenWandb:
    """A wandb logger whose media calls fail (a full disk, a dead service)."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append(metrics)

    def log_table(self, *args, **kwargs):
        raise OSError("wandb service died")

    def log_image(self, *args, **kwargs):
        raise AssertionError("not reached: the wrapper dropped wandb at the table")

    def save(self):
        pass


def test_a_failing_wandb_warns_once_and_the_other_loggers_still_get_the_report(written, tmp_path):
    report, plots = written
    broken = FailSafeLogger(BrokenWandb(), "wandb")
    csv = CSVLogger(save_dir=str(tmp_path), name="", version="")
    with pytest.warns(UserWarning, match=r"wandb logging failed and is now off \(OSError: wandb service died\)"):
        log_report([broken, csv], report, plots, step=1)
    assert broken.inner is None
    assert "eval/qat/kl" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
