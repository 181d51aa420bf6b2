"""Callback and loader pieces on their own: telemetry figures, BatchNorm freezing, fail-safe logging, loaders."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qat.cli import main
from qat.config import LayerConfig, QuantizerConfig
from qat.data.loading import EpochSampler, ResumableLoader
from qat.lightning.loggers import FailSafeLogger
from qat.lightning.schedule import freeze_batchnorm
from qat.lightning.telemetry import QuantTelemetry, weight_stats
from qat.modules import QuantLinear
from qat.run.train import print_summary, train
from tests.qat.run.helpers import FAST, fast_recipe


def test_weight_stats_match_a_hand_computation():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(32, 4), LayerConfig(QuantizerConfig(bits=3, group_size=16), None))
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        quantizer.scale.mul_(0.5)  # force some clipping
    scale, _ = quantizer.qparams()
    w = layer.weight.detach().reshape(4, 2, 16)
    s = scale.unsqueeze(-1)
    codes = torch.round(w / s)
    w_hat = codes.clamp(-4, 3) * s
    expected_sqnr = 10 * math.log10(float(w.square().sum()) / float((w - w_hat).square().sum()))
    expected_clipped = float(((codes < -4) | (codes > 3)).float().mean())
    stats = weight_stats(layer.weight, quantizer)
    assert stats["sqnr_db"] == pytest.approx(expected_sqnr, rel=1e-6)
    assert stats["clipped"] == pytest.approx(expected_clipped) and expected_clipped > 0


def test_telemetry_scale_drift_is_relative_to_the_first_look():
    model = nn.Sequential(QuantLinear.from_float(nn.Linear(32, 4), LayerConfig(QuantizerConfig(group_size=16), None)))
    telemetry = QuantTelemetry(every_n_steps=1)
    assert telemetry.collect(model)["quant/0/scale_drift"] == 0.0
    with torch.no_grad():
        model[0].weight_quantizer.scale.mul_(1.25)
    # scales are applied rounded to float16: each ratio is 1.25 within 2 half-precision roundings (2 * 2^-11)
    assert telemetry.collect(model)["quant/0/scale_drift"] == pytest.approx(0.25, abs=1.25 * 2**-10)


def test_freeze_batchnorm_stops_running_statistics():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    freeze_batchnorm(model)
    before = model[1].running_mean.clone()
    model(torch.randn(8, 4) + 3)
    assert torch.equal(model[1].running_mean, before) and model[0].training


class BatchNormWatch(pl.Callback):
    """Records the steps after `step` at which the first BatchNorm's running mean still changed."""

    def __init__(self, step: int):
        self.step, self.snapshot, self.changed_after = step, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        running_mean = pl_module.model.features[1].running_mean
        if trainer.global_step == self.step + 1:
            self.snapshot = running_mean.clone()
        elif self.snapshot is not None and not torch.equal(running_mean, self.snapshot):
            self.changed_after.append(trainer.global_step)


@pytest.mark.parametrize("freeze_step", [15, None])
def test_batchnorm_statistics_freeze_at_the_configured_step(tmp_path, freeze_step):
    watch = BatchNormWatch(15)
    recipe = fast_recipe(tmp_path, f"schedule.freeze_bn_step={'null' if freeze_step is None else freeze_step}",
                         "trainer.max_steps=30")
    train(recipe, extra_callbacks=[watch], quiet=True)
    assert (watch.changed_after == []) == (freeze_step is not None)


def test_fail_safe_logger_warns_once_and_drops_the_broken_logger():
    class Broken:
        def log_metrics(self, metrics, step=None):
            raise OSError("disk full")

    logger = FailSafeLogger(Broken(), "wandb")
    with pytest.warns(UserWarning, match=r"wandb logging failed and is now off \(OSError: disk full\)"):
        logger.log_metrics({"a": 1.0}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metrics({"a": 1.0}, step=1)  # no second warning, no exception
    assert logger.inner is None


def test_epoch_sampler_is_a_seeded_permutation_per_epoch_and_shards_by_rank(monkeypatch):
    sampler = EpochSampler(10, shuffle=True, seed=3)
    first, second = list(sampler), list(sampler)  # each pass is the next epoch
    assert sorted(first) == list(range(10)) and first == sampler.indices(0) and second == sampler.indices(1)
    assert first != second and sampler.epoch == 1
    import qat.data.loading as data_loading

    shards = []
    for rank in (0, 1, 2):
        monkeypatch.setattr(data_loading, "_rank_and_world", lambda rank=rank: (rank, 3))
        shards.append(sampler.indices(0))
    assert all(len(shard) == 3 for shard in shards)  # 10 samples over 3 ranks: 9 used, equal shares
    assert len({i for shard in shards for i in shard}) == 9


def epochs(loader, count):
    return [[batch[0].tolist() for batch in loader] for _ in range(count)]


def test_resumable_loader_restarts_at_the_saved_batch_or_the_next_epoch():
    data = torch.utils.data.TensorDataset(torch.arange(20.0))
    make = lambda: ResumableLoader(data, batch_size=4, shuffle=True, seed=0)  # noqa: E731
    reference = epochs(make(), 3)
    mid = make()
    mid.load_state_dict({"epoch": 1, "batches_done": 2, "epoch_complete": False})
    assert epochs(mid, 2) == [reference[1][2:], reference[2]]
    end = make()
    end.load_state_dict({"epoch": 0, "batches_done": 5, "epoch_complete": True})
    assert epochs(end, 2) == reference[1:]


def test_cli_train_runs_the_recipe_with_overrides(tmp_path, capsys):
    code = main(["train", "recipes/digits_w4a4.yaml", *FAST, f"logging.run_dir={tmp_path}", "trainer.max_steps=11"])
    assert code == 0
    out = capsys.readouterr().out
    assert "FP (float)" in out and "PTQ (calibrated)" in out and "QAT" in out


def test_cli_reports_recipe_errors_without_a_traceback(capsys):
    assert main(["train", "recipes/digits_w4a4.yaml", "trainer.max_epoch=3"]) == 2
    assert "did you mean 'max_epochs'" in capsys.readouterr().err


def test_cli_bench_forwards_its_options_to_the_kernel_benchmark(capsys):
    args = ["--shapes", "128x256", "--rows", "1", "--dtypes", "float32", "--rounds", "1", "--reps", "1",
            "--only", "reference", "--no-write"]
    assert main(["bench", *args]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128x256")]
    assert {row.split("|")[4].strip() for row in rows} == {"dense", "reference"}


def test_summary_table_names_both_roundings_when_gptq_ran():
    from rich.console import Console

    base = {"name": "r", "steps": 1, "seconds": 1.0, "run_dir": "d", "fp": {"ppl": 13.19}, "ptq": {"ppl": 14.41},
            "qat": {"ppl": 14.0}}
    for rtn, labels in ((None, ["PTQ (calibrated)"]), ({"ppl": 19.8}, ["PTQ round-to-nearest", "PTQ GPTQ"])):
        console = Console(record=True, width=120)
        print_summary({**base, "rtn": rtn}, console)
        text = console.export_text()
        assert all(label in text for label in labels)
        assert ("19.8000" in text) == (rtn is not None) and ("round-to-nearest" in text) == (rtn is not None)
