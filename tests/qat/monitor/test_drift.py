"""qat.monitor: sliding-window top-1 agreement and KL, with hand-computed values, and its alerts."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from qat.monitor import DriftError, DriftMonitor, sample_statistics


def test_sample_statistics_by_hand() -> None:
    reference = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2) and (3/4, 1/4)
    outputs = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # q = (3/4, 1/4) and (1/4, 3/4)
    agree, kl = sample_statistics(outputs, reference)
    assert agree.tolist() == [True, False]  # a tie's argmax is the first class, as q's first row
    kl_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_second = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert kl.tolist() == pytest.approx([kl_first, kl_second], abs=1e-6)  # float32 log-softmax


def test_identical_outputs_agree_with_zero_kl_over_token_dimensions() -> None:
    logits = torch.randn(3, 7, 11)
    agree, kl = sample_statistics(logits, logits.clone())
    assert agree.shape == (21,) and agree.all() and torch.equal(kl, torch.zeros(21))


def test_window_slides_over_the_last_samples() -> None:
    monitor = DriftMonitor(window=4, min_samples=4, min_agreement=0.0, max_kl=math.inf)
    right = torch.tensor([[2.0, 0.0]])
    wrong = torch.tensor([[0.0, 2.0]])
    for _ in range(3):
        monitor.update(right, right)
    status = monitor.update(wrong.repeat(2, 1), right.repeat(2, 1))  # window: right, right, wrong, wrong
    assert status.samples == 4 and status.agreement == 0.5
    status = monitor.update(right.repeat(3, 1), right.repeat(3, 1))  # right, right, right + the last wrong
    assert status.agreement == 0.75
    status = monitor.update(wrong.repeat(9, 1), right.repeat(9, 1))  # more samples than the window: last 4 kept
    assert status.samples == 4 and status.agreement == 0.0


def test_raise_mode_raises_past_a_threshold_only_after_min_samples() -> None:
    monitor = DriftMonitor(window=10, min_samples=3, min_agreement=0.9, max_kl=10.0, on_alert="raise")
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    monitor.update(wrong, right)  # 1 sample: below min_samples, no alert yet
    monitor.update(right, right)
    with pytest.raises(DriftError, match=r"top-1 agreement 0.6667 < 0.9"):
        monitor.update(right, right)


def test_kl_threshold_logs_once_per_crossing(caplog) -> None:
    monitor = DriftMonitor(window=2, min_samples=1, min_agreement=0.0, max_kl=0.01, on_alert="log")
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])  # same top-1, KL(p || q) = 0.0620
    with caplog.at_level(logging.INFO, logger="qat.monitor"):
        monitor.update(q, p)
        monitor.update(q, p)
        assert monitor.status.kl == pytest.approx(0.5 * math.log(0.5 / (math.e / (1 + math.e)))
                                                  + 0.5 * math.log(0.5 / (1 / (1 + math.e))), rel=1e-5)
        monitor.update(p, p)
        monitor.update(p, p)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("drift:") and "mean KL" in messages[0]
    assert messages[1].startswith("recovered:")


def test_a_function_receives_the_status_and_bad_settings_are_refused() -> None:
    seen = []
    monitor = DriftMonitor(window=5, min_samples=1, on_alert=seen.append)
    monitor.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert len(seen) == 1 and seen[0].agreement == 0.0 and seen[0].alerting
    with pytest.raises(ValueError, match="min_samples"):
        DriftMonitor(window=5, min_samples=6)
    with pytest.raises(ValueError, match="on_alert"):
        DriftMonitor(on_alert="email")
    with pytest.raises(ValueError, match="differ in shape"):
        monitor.update(torch.zeros(2, 3), torch.zeros(3, 3))


def test_check_golden_compares_a_loaded_model_with_the_files_golden_outputs(tmp_path) -> None:
    import qat
    from qat import QuantizerConfig, QuantSpec
    from qat.models import TinyLM
    from qat.monitor import check_golden

    torch.manual_seed(0)
    model, _ = qat.prepare(TinyLM(), QuantSpec(weight=QuantizerConfig(group_size=32, init="minmax")))
    tokens = torch.randint(0, 64, (2, 16))
    qat.export_model(model, tmp_path / "lm.safetensors", architecture={"_target_": "qat.models.TinyLM"},
                     golden_inputs=(tokens,))
    loaded = qat.load(tmp_path / "lm.safetensors", kernel_backend="reference")
    status = check_golden(loaded, tmp_path / "lm.safetensors")
    assert status.samples == 32 and status.agreement == 1.0 and status.kl == 0.0
