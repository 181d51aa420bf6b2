"""qat.monitor.accuracy (ATC) and the reference-free monitor's accuracy alert: the threshold on a hand-made set,
the estimate on a hand-made window, profiles without the estimate, an accuracy drop alerting and a harmless drift
not."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

import qat
from qat.cli import main
from qat.monitor import CalibrationProfile, ReferenceFreeMonitor, read_profile
from qat.monitor.accuracy import AccuracyEstimate, Threshold, atc_threshold, classification_targets, sample_scores
from qat.monitor.profile import ActivationTaps, output_rows, write_profile
from qat.monitor.reference_free import ACCURACY_ROWS
from tests.qat.monitor.conftest import digits_like


def test_atc_threshold_on_a_hand_made_set() -> None:
    scores = torch.tensor([0.55, 0.9, 0.7, 0.8, 0.6], dtype=torch.float64)
    correct = torch.tensor([True, True, False, True, False])  # 3 of 5: t is the third highest score
    assert atc_threshold(scores, correct) == 0.7
    assert float((scores >= atc_threshold(scores, correct)).double().mean()) == 0.6  # = the accuracy
    assert atc_threshold(scores, torch.ones(5, dtype=torch.bool)) == 0.55  # all correct: the lowest score
    none = atc_threshold(scores, torch.zeros(5, dtype=torch.bool))
    assert none > 0.9 and not bool((scores >= none).any())  # none correct: just above the highest


def test_fit_on_hand_made_logits() -> None:
    # confidences: two classes, softmax of (x, 0) = sigmoid(x); the entropy falls as the confidence rises
    margins = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.0])
    logits = torch.stack([margins, torch.zeros(6)], 1)
    targets = torch.tensor([0, 0, 1, 0, 1, 1])  # correct: 4, 3, 1 -> accuracy 1/2; argmax of margin 0 is class 0
    estimate = AccuracyEstimate.fit(logits, targets)
    assert estimate.samples == 6 and estimate.validation_accuracy == 0.5
    confidence = estimate.thresholds["confidence"]
    assert confidence.threshold == float(torch.sigmoid(torch.tensor(2.0))) and confidence.share == 0.5
    entropy = estimate.thresholds["negative_entropy"]
    assert entropy.threshold == float(sample_scores(logits)["negative_entropy"][2]) and entropy.share == 0.5
    assert estimate.hits(logits, "confidence").tolist() == [1, 1, 1, 0, 0, 0]
    again = AccuracyEstimate.from_json(estimate.to_json())
    assert again == estimate
    assert AccuracyEstimate.from_json({**estimate.to_json(), "version": 2}) is None  # a newer fit: unavailable
    confidence = torch.sigmoid(margins).double()
    assert estimate.mean_confidence == pytest.approx(float(confidence.mean()))
    assert estimate.confidence_sd == pytest.approx(float(confidence.std(unbiased=False)))
    assert estimate.values(logits, "doc").tolist() == pytest.approx(confidence.tolist())
    assert estimate.values(logits, "atc_mc").tolist() == [1, 1, 1, 0, 0, 0] and estimate.baseline("atc_mc") == 0.5


def test_classification_targets_of_loader_batches() -> None:
    x, y = torch.zeros(4, 3), torch.tensor([1, 2, 3, 0])
    assert classification_targets((x, y), 4).tolist() == [1, 2, 3, 0]
    assert classification_targets((x, y), 2).tolist() == [1, 2]
    assert classification_targets({"input_ids": x, "labels": torch.zeros(4, 7, dtype=torch.long)}, 4) is None
    assert classification_targets((x, torch.rand(4)), 4) is None  # a regression target
    assert classification_targets(x, 4) is None


def _monitor_with(exported: dict, estimate: AccuracyEstimate | None, **options) -> ReferenceFreeMonitor:
    profile = copy.deepcopy(read_profile(exported["with"]))
    profile.accuracy = estimate
    return ReferenceFreeMonitor(qat.load(exported["with"]), profile, on_alert=lambda s: None, **options)


HAND_MADE = AccuracyEstimate(samples=1000, validation_accuracy=0.9, mean_confidence=0.85, confidence_sd=0.1,
                             thresholds={"negative_entropy": Threshold(-0.5, 0.88), "confidence": Threshold(0.6, 0.9)})


def test_the_estimate_on_a_hand_made_window(exported: dict) -> None:
    with _monitor_with(exported, HAND_MADE, min_samples=100, estimator="atc_ne") as monitor:
        hits = torch.tensor([1.0] * 70 + [0.0] * 30)[:, None]  # 70 of 100 reach the threshold (validation: 88 %)
        status = monitor.add_rows({ACCURACY_ROWS: hits})
        assert status.samples == 100 and status.validation_accuracy == 0.9
        assert status.accuracy_drop == pytest.approx(0.18) and status.estimated_accuracy == pytest.approx(0.72)
        z = 1.959963984540054  # Wilson 95 % of 70 / 100, moved by a - s = +0.02
        centre = (0.7 + z * z / 200) / (1 + z * z / 100)
        half = z * math.sqrt(0.21 / 100 + z * z / 40000) / (1 + z * z / 100)
        assert status.accuracy_interval == pytest.approx((centre - half + 0.02, centre + half + 0.02))
        assert status.accuracy_z == pytest.approx(0.18 / math.sqrt(0.88 * 0.12 * (1 / 100 + 1 / 1000)))
        assert status.accuracy_alert and status.alerting and not status.drifting  # z = 5.3 > Phi^-1(1 - 1e-3)
        assert "accuracy falling: estimated accuracy 72.0 % (95 % CI" in str(status)
        monitor.reset()  # 85 of 100: a drop of 3 points, but z = 0.9: not significant, no alert
        status = monitor.add_rows({ACCURACY_ROWS: torch.tensor([1.0] * 85 + [0.0] * 15)[:, None]})
        assert status.accuracy_drop == pytest.approx(0.03) and not status.accuracy_alert
        monitor.reset()  # all 200 reach it: a rise of 12 points, no alert, the estimate clamped to [0, 1]
        status = monitor.add_rows({ACCURACY_ROWS: torch.ones(200, 1)})
        assert status.accuracy_drop == pytest.approx(-0.12) and status.estimated_accuracy == 1.0
        assert not status.alerting and str(status).startswith("last 200 samples: ok (estimated accuracy 100.0 %")


def test_the_doc_estimate_on_a_hand_made_window(exported: dict) -> None:
    with _monitor_with(exported, HAND_MADE, min_samples=100) as monitor:  # estimator="doc", the default
        confidence = torch.tensor([0.9] * 50 + [0.5] * 50)[:, None]  # mean 0.7 vs 0.85 on validation, sd 0.2
        status = monitor.add_rows({ACCURACY_ROWS: confidence})
        assert status.accuracy_drop == pytest.approx(0.15) and status.estimated_accuracy == pytest.approx(0.75)
        half = 1.959963984540054 * 0.2 / 10
        assert status.accuracy_interval == pytest.approx((0.75 - half, 0.75 + half))
        assert status.accuracy_z == pytest.approx(0.15 / math.sqrt(0.01 * (1 / 100 + 1 / 1000)))
        assert status.accuracy_alert
        monitor.reset()  # a drop of 1.5 points: under min_accuracy_drop, no alert
        status = monitor.add_rows({ACCURACY_ROWS: torch.full((100, 1), 0.835, dtype=torch.float64)})
        assert status.accuracy_drop == pytest.approx(0.015) and not status.accuracy_alert
    low = AccuracyEstimate(samples=100, validation_accuracy=1.0, mean_confidence=0.99, confidence_sd=0.0)
    assert low.null_variance("doc") == pytest.approx(100 / 101 ** 2)  # the floor: p0 = m / (m + 1)


def test_old_profiles_without_the_estimate(exported: dict) -> None:
    stored = read_profile(exported["with"]).to_json()  # written from unlabelled batches: no estimate
    assert "accuracy" not in stored and CalibrationProfile.from_json(stored).accuracy is None
    with _monitor_with(exported, None) as monitor:
        assert monitor.alert_on == "drift"  # as before the estimate existed
        status = monitor.add_rows({ACCURACY_ROWS: torch.zeros(200, 1)})
        assert status.estimated_accuracy is None and not status.accuracy_alert
        assert "accuracy estimate unavailable" in str(status)
    with pytest.raises(ValueError, match="needs the profile's accuracy estimate"):
        _monitor_with(exported, None, alert_on="accuracy")


@torch.no_grad()
def _recorded(model: torch.nn.Module, x: torch.Tensor, estimate: AccuracyEstimate, scale_layer: str = "") -> dict:
    """The monitor's per-sample rows of `x` through `model` (optionally with `scale_layer`'s input times 3)."""
    taps = ActivationTaps(model, 16, moments=False)
    handle = model.get_submodule(scale_layer).register_forward_pre_hook(lambda m, a: (a[0] * 3,)) \
        if scale_layer else None
    logits = model(x)
    rows = {**taps.take(len(x)), **output_rows(logits, 16, moments=False)}
    rows[ACCURACY_ROWS] = estimate.values(logits, "atc_mc")[:, None]
    taps.close()
    if handle is not None:
        handle.remove()
    return rows


def test_alert_on_an_accuracy_drop_not_on_a_harmless_drift(exported: dict) -> None:
    model = qat.load(exported["with"]).eval()
    generator = torch.Generator().manual_seed(21)
    with torch.no_grad():  # labels: the model's own class, except on its 10 % least confident samples
        x = digits_like(1000, generator)
        logits = model(x)
        confidence = sample_scores(logits)["confidence"]
        labels = logits.argmax(-1)
        unsure = confidence < confidence.quantile(0.1)
        labels[unsure] = (labels[unsure] + 1) % 10
    estimate = AccuracyEstimate.fit(logits, labels)
    assert estimate.validation_accuracy == pytest.approx(0.9, abs=0.002)
    clean = digits_like(500, generator)
    faded = clean * 0.05  # nearly blank images (a failing camera): the model's confidence falls, an ATC drop
    # the test model's softmax is nearly uniform (confidence ~0.125): the mean confidence hardly moves, ATC does
    with _monitor_with(exported, estimate, min_samples=100, estimator="atc_mc") as monitor:
        assert monitor.alert_on == "accuracy"
        status = monitor.add_rows(_recorded(model, clean, estimate))
        assert not status.alerting and abs(status.accuracy_drop) < 0.04, status
        monitor.reset()
        # harmless for accuracy here (the hits are those of the unchanged forward), a large drift in classifier.1
        harmless = {**_recorded(model, clean, estimate, scale_layer="classifier.1"),
                    ACCURACY_ROWS: _recorded(model, clean, estimate)[ACCURACY_ROWS]}
        status = monitor.add_rows(harmless)
        assert status.drifting and "classifier.1" in status.layers and not status.alerting, status
        assert "drift (warning, not alerting): classifier.1" in str(status)
        monitor.reset()
        status = monitor.add_rows(_recorded(model, faded, estimate))
        assert status.accuracy_alert and status.alerting and status.accuracy_drop > 0.1, status
    with _monitor_with(exported, estimate, alert_on="both", estimator="atc_mc") as monitor:  # drift alerts if asked
        assert monitor.add_rows(harmless).alerting


def test_cli_alerts_on_the_estimated_accuracy(exported: dict, tmp_path, capsys) -> None:
    generator = torch.Generator().manual_seed(22)
    model = qat.load(exported["with"]).eval()
    x = digits_like(600, generator)
    with torch.no_grad():  # labels: the model's own class, except on its 10 % least confident samples
        logits = model(x)
        labels = logits.argmax(-1)
        confidence = sample_scores(logits)["confidence"]
        unsure = confidence < confidence.quantile(0.1)
        labels[unsure] = (labels[unsure] + 1) % 10
    labelled = tmp_path / "labelled.safetensors"
    shutil.copy(exported["with"], labelled)
    profile = write_profile(labelled, list(zip(x.split(200), labels.split(200), strict=True)))  # (x, y) batches
    assert profile.accuracy is not None and profile.accuracy.validation_accuracy == pytest.approx(0.9, abs=0.01)
    clean, faded = tmp_path / "clean.pt", tmp_path / "faded.pt"
    torch.save(digits_like(300, generator), clean)
    torch.save(digits_like(300, generator) * 0.05, faded)  # nearly blank images
    assert main(["monitor", str(labelled), str(clean), "--estimator", "atc_mc"]) == 0
    assert "ok (estimated accuracy" in capsys.readouterr().out
    assert main(["monitor", str(labelled), str(faded), "--batch-size", "100", "--estimator", "atc_mc"]) == 1
    assert "alert after 200 samples: accuracy falling (estimated accuracy" in capsys.readouterr().out
    assert main(["monitor", str(exported["with"]), str(faded), "--alert-on", "accuracy"]) == 2  # no estimate
    assert "needs the profile's accuracy estimate" in capsys.readouterr().err
