"""qat.monitor.profile: histogram / clip-rate statistics by hand, and the profile's round trip through the file."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qat
from qat.config import LayerConfig, QuantizerConfig
from qat.export.reader import read_header
from qat.export.save import KEY_PROFILE
from qat.modules import QuantLinear
from qat.monitor import CalibrationProfile, ProfileMissingError, ReferenceFreeMonitor, build_profile, read_profile
from qat.monitor.profile import feature_rows, histogram_rows
from tests.qat.monitor.conftest import clean_batches, digits_like


def test_histogram_rows_by_hand() -> None:
    # bins of width 1 over [-0.5, 3.5): codes 0..3; under < -0.5, over >= 3.5; NaN counts as over
    values = torch.tensor([[-0.6, -0.5, 0.49, 0.5, 3.49, 3.5, 10.0, float("nan")],
                           [0.0, 1.0, 1.2, 2.0, 2.0, 2.9, 3.0, 3.0]])
    shares = histogram_rows(values, -0.5, 3.5, 4)
    assert (shares * 8).tolist() == [[1, 2, 1, 0, 1, 3], [0, 1, 2, 2, 3, 0]]
    features = feature_rows(values[1:], -0.5, 3.5, 4)
    assert features[0, 6].item() == 0.0  # clip rate: under + over
    assert features[0, 7].item() == pytest.approx(values[1].mean().item())


def test_profile_clip_rate_and_histogram_exact_on_a_hand_built_layer() -> None:
    config = QuantizerConfig(bits=2, symmetric=False, quantizer="lsq_plus", granularity="tensor",
                             init="minmax")  # codes 0..3
    layer = QuantLinear.from_float(nn.Linear(4, 2), LayerConfig(weight=QuantizerConfig(bits=4, granularity="channel"),
                                                                activation=config))
    layer.input_quantizer.set_qparams(torch.tensor([0.5]), torch.tensor([1.0]))  # code u = 2 x + 1
    model = nn.Sequential(layer).eval()
    # per sample, codes 2x + 1: sample 0 -> -1 (under), 1, 3, 5 (over); sample 1 -> 0, 1, 2, 3 (no clipping)
    inputs = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [-0.5, 0.0, 0.5, 1.0]])
    profile = build_profile(model, [inputs], bins=4)
    channel = profile.channels["0"]
    assert profile.samples == 2 and channel.kind == "input" and (channel.low, channel.high) == (-0.5, 3.5)
    assert channel.hist == [0.125, 0.125, 0.25, 0.125, 0.25, 0.125]  # mean shares of the two samples
    assert channel.clip_rate == 0.25 and channel.clip_sd == 0.25  # samples clip 1/2 and 0
    assert channel.mean == pytest.approx(1.75) and channel.values_per_sample == 4
    assert set(profile.channels) == {"0", "output.confidence", "output.entropy"}


def test_profile_round_trips_through_the_file(exported: dict) -> None:
    stored = read_profile(exported["with"])
    assert stored is not None and stored.to_json() == exported["profile"].to_json()
    assert set(stored.channels) >= {"features.0", "features.3", "classifier.1", "classifier.4"}
    assert stored.channels["features.0"].kind == "input" and stored.channels["features.3"].kind == "activation"
    # the stored profile is the loaded model's on the clean data, and the file still loads and verifies
    loaded = qat.load(exported["with"])
    assert build_profile(loaded, clean_batches()).to_json() == stored.to_json()


def test_an_old_file_without_a_profile_loads_and_the_monitor_says_what_is_missing(exported: dict) -> None:
    assert KEY_PROFILE not in read_header(exported["without"]).metadata
    assert read_profile(exported["without"]) is None
    qat.load(exported["without"])  # loads as before
    with pytest.raises(ProfileMissingError, match=r"has no calibration profile.*clean in-distribution data"):
        ReferenceFreeMonitor.from_file(exported["without"])
    with ReferenceFreeMonitor.from_file(exported["without"], clean=[digits_like(256, torch.Generator())]) as monitor:
        assert set(monitor.profile.channels) == set(exported["profile"].channels)


def test_a_newer_profile_version_is_refused() -> None:
    with pytest.raises(ValueError, match="newer than this qat reads"):
        CalibrationProfile.from_json({"version": 99, "samples": 1, "bins": 4, "channels": {}})


class _ValidationData:
    """The part of a Lightning data module the export reads: validation batches (inputs, labels)."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def setup(self, stage: str) -> None:
        pass

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs, torch.zeros(len(self.inputs), dtype=torch.long)), batch_size=100)


def test_a_run_export_writes_the_profile_of_its_validation_data(tmp_path) -> None:
    from qat.run.export import export_trained
    from tests.qat.monitor.conftest import ARCHITECTURE, prepared_model

    path = tmp_path / "run.safetensors"
    inputs = digits_like(300, torch.Generator().manual_seed(3))
    report = export_trained(prepared_model(), path, ARCHITECTURE, "hash", _ValidationData(inputs))
    profile = read_profile(path)
    assert profile is not None and profile.samples == 300 and report.file_bytes == path.stat().st_size
    labelled = _ValidationData(inputs).val_dataloader()  # the export saw the labels: the accuracy estimate's fit
    assert profile.accuracy is not None and profile.accuracy.samples == 300
    assert profile.to_json() == build_profile(qat.load(path), labelled).to_json()
    unlabelled = build_profile(qat.load(path), [inputs])  # bare inputs: the same statistics, no estimate
    assert unlabelled.accuracy is None and "accuracy" not in unlabelled.to_json()
    assert unlabelled.to_json() == {k: v for k, v in profile.to_json().items() if k != "accuracy"}
