"""What a resumed run keeps: the CSV history continues, checkpoints are overwritten in place (no `-v1`
copies), a copied run directory keeps its best score, and resuming shows no "directory not empty" warning."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from qat.lightning.checkpoint_io import RunCheckpoint, saved_step
from qat.lightning.loggers import RunCSVLogger


def write_history(run_dir: Path, steps: range) -> None:
    with (run_dir / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["epoch", "step", "train/loss"])
        writer.writeheader()
        writer.writerows({"epoch": 0, "step": step, "train/loss": step / 10} for step in steps)


def history(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run_dir / "metrics.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_a_resumed_csv_log_keeps_the_rows_before_the_checkpoint_step_and_drops_the_later_ones(tmp_path):
    write_history(tmp_path, range(10))  # the killed run logged steps 0..9; its checkpoint holds 5 steps
    logger = RunCSVLogger(tmp_path, resume_step=5)
    logger.log_metrics({"epoch": 0, "train/loss": 0.55}, step=5)
    logger.log_metrics({"epoch": 0, "val/acc": 0.75}, step=6)  # a new column: the header widens
    header, rows = history(tmp_path)
    assert header == ["epoch", "step", "train/loss", "val/acc"]
    assert [row["step"] for row in rows] == ["0", "1", "2", "3", "4", "5", "6"]
    assert rows[:5] == [{"epoch": "0", "step": str(s), "train/loss": str(s / 10), "val/acc": ""} for s in range(5)]
    assert rows[5:] == [{"epoch": "0", "step": "5", "train/loss": "0.55", "val/acc": ""},
                        {"epoch": "0", "step": "6", "train/loss": "", "val/acc": "0.75"}]


def test_rows_reach_the_file_as_they_are_logged(tmp_path):
    """Lightning buffers 100 steps: a SIGKILL would lose the history up to the checkpoint resumed from."""
    logger = RunCSVLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.5}, step=3)
    assert [row["step"] for row in history(tmp_path)[1]] == ["3"]


def test_a_new_run_starts_an_empty_csv_log(tmp_path):
    write_history(tmp_path, range(4))
    RunCSVLogger(tmp_path).log_metrics({"train/loss": 2.0}, step=0)
    assert history(tmp_path) == (["step", "train/loss"], [{"step": "0", "train/loss": "2.0"}])


def _setup(callback: RunCheckpoint) -> list[str]:
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda value: value), is_global_zero=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.setup(trainer, None, "fit")
    return [str(w.message) for w in caught]


def test_the_not_empty_warning_is_left_out_only_when_resuming(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    new_run = _setup(RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", save_top_k=1))
    assert any("exists and is not empty" in message for message in new_run)  # unexpected there: shown
    assert _setup(RunCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", save_top_k=1,
                                resuming=True)) == []


def test_checkpoints_are_overwritten_in_place_never_versioned():
    assert RunCheckpoint(save_last=True, save_top_k=0)._enable_version_counter is False


def test_a_copied_run_directory_keeps_its_best_score_and_paths(tmp_path):
    old, new = tmp_path / "version_0" / "checkpoints", tmp_path / "version_1" / "checkpoints"
    callback = RunCheckpoint(dirpath=new, filename="best", monitor="val/acc", mode="max", save_top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "dirpath has changed ... won't be reloaded" included
        callback.load_state_dict({
            "monitor": "val/acc", "best_model_score": torch.tensor(0.9), "best_model_path": str(old / "best.ckpt"),
            "current_score": torch.tensor(0.8), "dirpath": str(old), "best_k_models": {str(old / "best.ckpt"): 0.9},
            "kth_best_model_path": str(old / "best.ckpt"), "kth_value": 0.9, "last_model_path": str(old / "last.ckpt")})
    # the score kept: a worse first validation after resume leaves best.ckpt alone
    assert callback.best_model_score.item() == torch.tensor(0.9).item()
    assert (callback.best_model_path, callback.kth_best_model_path) == (str(new / "best.ckpt"),) * 2
    assert callback.best_k_models == {str(new / "best.ckpt"): 0.9}
    assert callback.last_model_path == str(new / "last.ckpt")  # so last.ckpt is overwritten, not last-v1.ckpt


def test_saved_step_reads_the_global_step_recorded_in_the_checkpoint(tmp_path):
    torch.save({"global_step": 42, "state_dict": {"w": torch.zeros(3)}}, tmp_path / "x.ckpt")
    assert saved_step(tmp_path / "x.ckpt") == 42
