"""A whole run: schedule phases, run directory, metrics, guards and logging."""

from __future__ import annotations

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import qat.lightning.loggers as loggers_module
from qat.config import ConfigError
from qat.control import quantizers
from qat.lightning.nonfinite import NonFiniteLossError
from qat.run.train import train
from tests.qat.run.helpers import ROOT, fast_recipe


class PhaseRecorder(pl.Callback):
    """Records, per optimizer step, whether weight / activation fake-quant was on."""

    def __init__(self):
        self.weights_on: dict[int, bool] = {}
        self.activations_on: dict[int, bool] = {}
        self.frozen: dict[int, bool] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step that just ran
        weights = [q for _, q in quantizers(pl_module.model, "weight")]
        acts = [q for _, q in quantizers(pl_module.model, "activation")]
        self.weights_on[step] = all(q.enabled for q in weights)
        self.activations_on[step] = all(q.enabled for q in acts)
        self.frozen[step] = all(not q.scale.requires_grad for q in weights)


def test_run_goes_through_warmup_calibration_and_qat(tmp_path):
    recorder = PhaseRecorder()
    recipe = fast_recipe(tmp_path, "schedule.activation_start_step=14", "schedule.freeze_step=20")
    summary = train(recipe, extra_callbacks=[recorder], quiet=True)
    assert not any(recorder.weights_on[s] for s in range(10))  # FP warm-up: fake-quant off
    assert all(recorder.weights_on[s] for s in range(10, 30))
    assert not any(recorder.activations_on[s] for s in range(14))
    assert all(recorder.activations_on[s] for s in range(14, 30))
    assert not any(recorder.frozen[s] for s in range(20)) and all(recorder.frozen[s] for s in range(20, 30))
    assert set(summary) >= {"fp", "ptq", "qat", "run_dir", "steps"}
    assert summary["steps"] == 30
    for stage in ("fp", "ptq", "qat"):
        assert 0.0 <= summary[stage]["acc"] <= 1.0 and summary[stage]["ece"] >= 0.0


def test_run_directory_holds_recipe_checkpoints_metrics_and_summary(tmp_path):
    summary = train(fast_recipe(tmp_path), quiet=True)
    run_dir = tmp_path / "digits_w4a4" / "version_0"
    assert summary["run_dir"] == str(run_dir)
    for name in ("recipe.yaml", "summary.json", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 30
    with open(run_dir / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    for key in ("train/loss", "val/acc", "val/ece", "fp/acc", "ptq/acc", "quant/mean_sqnr_db", "quant/mean_clipped"):
        assert key in columns, key
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["qat"]["recipe_hash"] == summary["recipe_hash"]
    assert checkpoint["callbacks"]  # schedule state is saved


def test_a_second_run_gets_a_new_version_directory(tmp_path):
    train(fast_recipe(tmp_path, "trainer.max_steps=11"), quiet=True)
    summary = train(fast_recipe(tmp_path, "trainer.max_steps=11"), quiet=True)
    assert summary["run_dir"].endswith("version_1")


def test_quantizer_parameters_get_their_own_optimizer_group(tmp_path):
    from qat.run.build import build

    run = build(fast_recipe(tmp_path, "optimizer.quantizer_lr=0.0005", "optimizer.schedule=constant"))
    run.module.trainer = run.trainer
    optimizer = run.module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["quantizers"]["lr"] == 0.0005 and groups["quantizers"]["weight_decay"] == 0.0
    assert groups["biases_norms"]["weight_decay"] == 0.0 and groups["weights"]["weight_decay"] == 0.01
    quant_ids = {id(p) for p in groups["quantizers"]["params"]}
    assert all(id(q.scale) in quant_ids for _, q in quantizers(run.model))


class ExplodesAtStep(nn.Module):
    """A digits model whose output turns NaN from a given forward call on."""

    def __init__(self, at: int = 15):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.calls, self.at = 0, at

    def forward(self, x):
        self.calls += 1 if self.training else 0
        out = self.net(x)
        return out * float("nan") if self.training and self.calls > self.at else out


def test_non_finite_loss_stops_the_run_with_a_diagnostic_checkpoint(tmp_path, monkeypatch):
    import qat.run.models

    monkeypatch.setattr(qat.run.models, "instantiate",
                        _instantiate_with(ExplodesAtStep(at=15), qat.run.models.instantiate))
    recipe = fast_recipe(tmp_path, "quant.rules=[]", "quant.weight.granularity=channel")
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 15.*Diagnostic checkpoint") as info:
        train(recipe, quiet=True)
    diagnostic = tmp_path / "digits_w4a4" / "version_0" / "checkpoints" / "nonfinite-step15.ckpt"
    assert diagnostic.is_file() and str(diagnostic) in str(info.value)
    state = torch.load(diagnostic, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def _instantiate_with(model, original):
    def instantiate(target, key, **extra):
        return model if key == "model" else original(target, key, **extra)

    return instantiate


def test_wandb_offline_writes_a_local_run(tmp_path):
    train(fast_recipe(tmp_path, "logging.wandb=offline", "trainer.max_steps=11"), quiet=True)
    runs = list((tmp_path / "digits_w4a4" / "version_0" / "wandb").glob("offline-run-*"))
    assert runs, "wandb offline run directory missing"


def test_each_run_in_one_process_gets_its_own_wandb_run(tmp_path):
    """Lightning leaves a wandb run open until the process exits; a second run (a sweep, a notebook) must not
    log into the first one's."""
    import wandb

    for _ in range(2):
        train(fast_recipe(tmp_path, "logging.wandb=offline", "trainer.max_steps=3"), quiet=True)
        assert wandb.run is None
    for version in ("version_0", "version_1"):
        assert len(list((tmp_path / "digits_w4a4" / version / "wandb").glob("offline-run-*"))) == 1, version


class BrokenLogger(pl.loggers.Logger):
    name, version = "broken", "0"

    def log_metrics(self, metrics, step=None):
        raise ConnectionError("wandb servers unreachable")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("where", ["init", "logging"])
def test_wandb_failure_never_stops_the_run(tmp_path, monkeypatch, where):
    def failing_factory(*args, **kwargs):
        if where == "init":
            raise RuntimeError("wandb init failed")
        return BrokenLogger()

    monkeypatch.setattr(loggers_module, "make_wandb_logger", failing_factory)
    with pytest.warns(UserWarning, match="wandb"):
        summary = train(fast_recipe(tmp_path, "logging.wandb=online", "trainer.max_steps=11"), quiet=True)
    assert summary["steps"] == 11
    assert (tmp_path / "digits_w4a4" / "version_0" / "metrics.csv").is_file()


def test_resuming_with_a_changed_quantization_spec_is_refused(tmp_path):
    train(fast_recipe(tmp_path, "trainer.max_steps=12"), quiet=True)
    changed = fast_recipe(tmp_path, "trainer.max_steps=20", "resume=last", "quant.weight.bits=3")
    with pytest.raises(ConfigError, match=r"cannot resume: the recipe's quantization spec"):
        train(changed, quiet=True)


def test_resume_last_without_a_previous_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resume=last: no checkpoints/last\.ckpt"):
        train(fast_recipe(tmp_path, "resume=last"), quiet=True)


def test_language_model_task_logs_perplexity(tmp_path):
    path = ROOT / "recipes" / "tinylm_w4.yaml"
    recipe = fast_recipe(tmp_path, "trainer.max_steps=12", "schedule.warmup_steps=4", "data.args.batch_size=32",
                         path=path)
    summary = train(recipe, quiet=True)
    assert summary["qat"]["ppl"] > 1.0
    assert summary["qat"]["ppl"] == pytest.approx(torch.tensor(summary["qat"]["loss"]).exp().item(), rel=1e-4)


def test_cpu_threads_sets_torchs_intra_op_threads_for_the_run(tmp_path):
    from qat.run.build import build

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build(fast_recipe(tmp_path, "trainer.cpu_threads=1"))
        assert torch.get_num_threads() == 1
        build(fast_recipe(tmp_path))  # not set: torch's count is left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def metrics_steps(run_dir) -> tuple[list[dict[str, str]], list[int]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, [int(row["step"]) for row in rows]


def test_resume_in_place_continues_the_metrics_history(tmp_path, recwarn):
    """A finished run (its last.ckpt written at the end of its last epoch) resumed for one more epoch
    writes the uninterrupted two-epoch run's metrics.csv, byte for byte (constant learning rate: the
    cosine schedule would follow the number of epochs)."""
    same = ("trainer.max_steps=-1", "trainer.log_every_n_steps=2", "optimizer.schedule=constant")
    train(fast_recipe(tmp_path / "full", "trainer.max_epochs=2", *same), quiet=True)
    uninterrupted = tmp_path / "full" / "digits_w4a4" / "version_0" / "metrics.csv"
    run_dir = tmp_path / "digits_w4a4" / "version_0"
    train(fast_recipe(tmp_path, "trainer.max_epochs=1", *same), quiet=True)
    first, first_steps = metrics_steps(run_dir)
    recwarn.clear()
    train(fast_recipe(tmp_path, "trainer.max_epochs=2", *same, "resume=last"), quiet=True)
    rows, steps = metrics_steps(run_dir)
    assert first_steps == [1, 3, 5, 7, 9, 10, 11, 11]  # epoch 0 (12 steps), PTQ figures at 10, validation
    assert steps == [*first_steps, 13, 15, 17, 19, 21, 23, 23]
    assert [{key: row[key] for key in first[0]} for row in rows[:len(first)]] == first  # kept as they were
    assert (run_dir / "metrics.csv").read_text() == uninterrupted.read_text()
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # expected on resume


def test_resume_from_a_run_stopped_by_max_steps_logs_each_row_at_its_own_step(tmp_path):
    """Lightning counts one stepped batch too many when it resumes from the checkpoint of an epoch's last
    step: without `ResumedLogStep` every resumed row would carry the next step's number (and figures)."""
    same = ("trainer.log_every_n_steps=2", "optimizer.schedule=constant")
    train(fast_recipe(tmp_path / "full", "trainer.max_steps=24", *same), quiet=True)
    uninterrupted, _ = metrics_steps(tmp_path / "full" / "digits_w4a4" / "version_0")
    train(fast_recipe(tmp_path, "trainer.max_steps=12", *same), quiet=True)
    train(fast_recipe(tmp_path, "trainer.max_steps=24", *same, "resume=last"), quiet=True)
    rows, _ = metrics_steps(tmp_path / "digits_w4a4" / "version_0")
    # The epoch column aside: Lightning's current_epoch after this restart is one ahead (noted, not qat's).
    assert [{k: v for k, v in row.items() if k != "epoch"} for row in rows] == \
        [{k: v for k, v in row.items() if k != "epoch"} for row in uninterrupted]


def test_resume_last_takes_the_newest_run_and_in_it_the_highest_recorded_step(tmp_path):
    """By what the files record, not their names or mtimes: a stale last.ckpt beside a newer last-v1.ckpt
    (written by resumes before qat overwrote last.ckpt in place) and touched last loses."""
    import os

    from qat.run.build import newest_checkpoint

    steps = {"version_0/checkpoints/last.ckpt": 500, "version_1/checkpoints/last.ckpt": 12,
             "version_1/checkpoints/last-v1.ckpt": 20, "version_1/checkpoints/best.ckpt": 99}
    for name, step in steps.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step}, tmp_path / name)
    os.utime(tmp_path / "version_1/checkpoints/last.ckpt")  # the newest mtime
    assert newest_checkpoint(tmp_path) == tmp_path / "version_1/checkpoints/last-v1.ckpt"


def test_a_copied_run_directory_resumes_into_its_own_last_ckpt(tmp_path, recwarn):
    import shutil

    from qat.lightning.checkpoint_io import saved_step

    base = tmp_path / "digits_w4a4"
    train(fast_recipe(tmp_path, "trainer.max_steps=12"), quiet=True)
    original = {p.name: p.read_bytes() for p in (base / "version_0" / "checkpoints").iterdir()}
    shutil.copytree(base / "version_0", base / "version_1")
    summary = train(fast_recipe(tmp_path, "trainer.max_steps=24", "resume=last"), quiet=True)
    assert summary["run_dir"] == str(base / "version_1")
    checkpoints = base / "version_1" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1.ckpt
    assert saved_step(checkpoints / "last.ckpt") == 24
    assert {p.name: p.read_bytes() for p in (base / "version_0" / "checkpoints").iterdir()} == original
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]  # best score kept
