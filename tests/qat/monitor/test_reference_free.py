"""qat.monitor.reference_free: quiet on clean data over many windows, fires on a moved layer and names it;
`qat monitor FILE DATA`."""

from __future__ import annotations

import torch
from torch import nn

import qat
from qat.cli import main
from qat.monitor import ReferenceFreeMonitor, read_profile
from qat.monitor.reference_free import z_threshold
from tests.qat.monitor.conftest import digits_like


def stream(monitor: ReferenceFreeMonitor, batches: int, seed: int, batch_size: int = 100, scale_layer: str = "",
           ) -> list[int]:
    """Feed `batches` batches of fresh clean data; returns the sample counts at which alerts began."""
    onsets, seen = [], 0
    monitor.on_alert = lambda status: onsets.append(seen) if status.alerting else None
    handle = None
    if scale_layer:  # the layer's input, times 3
        handle = monitor.model.get_submodule(scale_layer).register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for _ in range(batches):
                seen += batch_size
                monitor(digits_like(batch_size, generator))
    finally:
        if handle is not None:
            handle.remove()
    return onsets


def test_quiet_on_clean_data_over_many_windows(exported: dict) -> None:
    with ReferenceFreeMonitor.from_file(exported["with"], window=500, min_samples=100) as monitor:
        onsets = stream(monitor, batches=200, seed=11)  # 20,000 fresh samples, 40 full windows
        assert onsets == [], f"false alarms at {onsets}: {monitor.status}"
        assert not monitor.status.alerting and monitor.status.samples == 500
        assert monitor.update(torch.zeros(0, 10)) is not None  # an empty batch is fine


def test_fires_naming_the_layer_whose_input_is_scaled_by_3(exported: dict) -> None:
    with ReferenceFreeMonitor.from_file(exported["with"], window=500, min_samples=100, check_every=100) as monitor:
        onsets = stream(monitor, batches=5, seed=12, scale_layer="classifier.1")
        status = monitor.status
    assert onsets == [100], status  # at the first check
    assert status.layers[0] == "classifier.1" and "features.3" not in status.layers, status
    assert "clip rate" in status.alerts[0]


def test_threshold_is_the_bonferroni_bound(exported: dict) -> None:
    profile = read_profile(exported["with"])
    with ReferenceFreeMonitor(qat.load(exported["with"]), profile, false_alarm=1e-3) as monitor:
        features = len(profile.channels) * (profile.bins + 3)
        assert monitor.threshold == z_threshold(1e-3, features)
        assert 4 < monitor.threshold < 5


def test_input_drift_is_reported_without_alerting_unless_asked(exported: dict) -> None:
    model = qat.load(exported["with"])
    profile = read_profile(exported["with"])
    x = digits_like(300, torch.Generator().manual_seed(13)) + 0.3  # brightness: the input quantizer moves
    for alert_on_input in (False, True):
        with ReferenceFreeMonitor(model, profile, alert_on_input=alert_on_input, on_alert=lambda s: None) as monitor, \
                torch.no_grad():
            status = monitor.update(model(x))
        assert any(line.startswith("features.0 ") for line in status.input_drift) != alert_on_input
        assert ("features.0" in status.layers) == alert_on_input


def test_cli_on_a_tiny_file(exported: dict, tmp_path, capsys) -> None:
    generator = torch.Generator().manual_seed(14)
    clean, shifted = tmp_path / "clean.pt", tmp_path / "shifted.pt"
    torch.save(digits_like(300, generator), clean)
    torch.save(digits_like(300, generator) * 3, shifted)
    assert main(["monitor", str(exported["with"]), str(clean)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["monitor", str(exported["with"]), str(shifted), "--batch-size", "100"]) == 1
    out = capsys.readouterr().out  # the first check: 128 samples pending; no estimate in this profile: drift alerts
    assert "alert after 200 samples: drift: " in out and "accuracy estimate unavailable" in out
    assert main(["monitor", str(exported["without"]), str(shifted)]) == 2
    assert "no calibration profile" in capsys.readouterr().err
    assert main(["monitor", str(exported["without"]), str(shifted), "--clean", str(clean), "--json"]) == 1
    assert '"alerting": true' in capsys.readouterr().out


def test_a_fake_quant_model_can_be_monitored_too(exported: dict) -> None:
    model: nn.Module = exported["model"]
    profile = read_profile(exported["with"])
    with ReferenceFreeMonitor(model, profile, on_alert=lambda s: None) as monitor:
        assert set(monitor.names) == set(profile.channels)


def test_sample_every_counts_samples_across_batches(exported: dict) -> None:
    model = qat.load(exported["with"])
    with ReferenceFreeMonitor(model, read_profile(exported["with"]), sample_every=4, check_every=1,
                              on_alert=lambda s: None) as monitor:
        generator = torch.Generator().manual_seed(15)
        with torch.no_grad():
            for batch in (1, 1, 1, 1, 1, 3, 6):  # samples 0, 4, 8, 12 of 14 are looked at
                monitor(digits_like(batch, generator))
        assert monitor.status.samples == 4
