"""The report: its numbers are the raw metrics of the models' outputs; files and plots are written."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from qat import QuantSpec
from qat.config import QuantizerConfig
from qat.control import set_fake_quant
from qat.eval import metrics
from qat.eval.evaluate import compare
from qat.eval.layers import output_errors, sqnr_db, weight_sqnr
from qat.eval.outputs import EvalError, collect
from qat.eval.report import markdown, write_report
from qat.eval.robustness import perturbation, photometric, substitute_tokens
from qat.lightning.telemetry import weight_stats
from qat.swap import prepare
from tests.qat.eval.toy_models import FragileMLP


def _quantized(model, bits):
    spec = QuantSpec(weight=QuantizerConfig(bits=bits, granularity="channel"))
    prepared, _ = prepare(copy.deepcopy(model), spec)
    set_fake_quant(prepared, weights=True)
    return prepared.eval()


@pytest.fixture(scope="module")
def toy():
    float_model = FragileMLP().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 32, generator=generator)
    with torch.no_grad():
        labels = float_model(x).argmax(-1)
    labels[::7] = (labels[::7] + 1) % 32  # some float errors, so both flip directions can happen
    batches = [(x[:48], labels[:48]), (x[48:], labels[48:])]
    models = {"float": float_model, "ptq": _quantized(float_model, 2), "qat": _quantized(float_model, 4)}
    return models, batches, compare(models, batches, "classification", noise_levels=[0.0, 0.5])


def test_report_stage_numbers_equal_the_raw_metrics_of_each_models_outputs(toy):
    models, batches, report = toy
    reference = collect(models["float"], batches)
    for name, model in models.items():
        out = collect(model, batches)
        flip = metrics.flips(out.predictions, reference.predictions, out.labels)
        stage = report["stages"][name]
        assert stage["accuracy"] == metrics.accuracy(out.logits, out.labels)
        assert stage["agreement"] == metrics.agreement(out.logits, reference.logits)
        assert stage["kl"] == metrics.mean_kl(out.logits, reference.logits)
        assert stage["ece"] == metrics.ece(out.probabilities, out.labels)
        assert stage["nll"] == metrics.nll(out.logits, out.labels)
        assert (stage["correct_to_wrong"], stage["wrong_to_correct"]) == (flip["correct_to_wrong"],
                                                                         flip["wrong_to_correct"])
        assert report["slices"][name] == metrics.per_class(out.logits, out.labels)
    assert report["stages"]["float"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert report["stages"]["ptq"]["correct_to_wrong"] > 0


def test_gap_recovered_and_robustness_come_from_the_stage_values(toy):
    models, batches, report = toy
    stages = report["stages"]
    higher_is_better = {"accuracy": True, "agreement": True, "nll": False, "ece": False, "kl": False}
    assert set(report["gap_recovered"]["qat"]) == set(higher_is_better)
    for key, value in report["gap_recovered"]["qat"].items():
        fp, ptq, qat = stages["float"][key], stages["ptq"][key], stages["qat"][key]
        ptq_worse = ptq < fp if higher_is_better[key] else ptq > fp
        assert value == (metrics.gap_recovered(fp, ptq, qat) if ptq_worse else None)
    assert report["gap_recovered"]["qat"]["kl"] is not None  # 2-bit PTQ is farther from float than 4-bit
    robust = report["robustness"]
    assert robust["levels"] == [0.0, 0.5]
    assert robust["stages"]["float"][0] == stages["float"]["accuracy"]  # level 0: the clean figure
    noisy = collect(models["qat"], batches, transform=perturbation(0.5, seed=0))
    assert robust["stages"]["qat"][1] == metrics.accuracy(noisy.logits, noisy.labels)


def test_written_json_and_markdown_hold_the_same_numbers_and_the_plots_are_pngs(toy, tmp_path):
    _, _, report = toy
    report = {**report, "name": "toy", "source": "memory",
              "size": {"float_bytes": 8000, "int4_bytes": 1000, "nominal_bytes": 900, "bits_per_weight": 4.5,
                       "ratio_vs_float": 8.0}}
    paths = write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["stages"] == report["stages"]
    text = paths["md"].read_text()
    assert text == markdown(report)
    for stage in ("ptq", "qat"):
        assert f"{report['stages'][stage]['accuracy']:.4f}" in text
        assert f"{report['stages'][stage]['kl']:.4f}" in text
    assert set(paths) >= {"layers", "reliability", "slices", "robustness", "size"}
    for name in ("layers", "reliability", "slices", "robustness", "size"):
        data = paths[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_per_layer_errors_worst_first_and_equal_to_float_for_the_float_model(toy):
    models, batches, _ = toy
    x = batches[0][0]
    same = output_errors(models["float"], copy.deepcopy(models["float"]), x)
    assert [row["output_sqnr_db"] for row in same] == [math.inf, math.inf]
    rows = output_errors(models["float"], models["ptq"], x)
    assert [r["output_sqnr_db"] for r in rows] == sorted(r["output_sqnr_db"] for r in rows)
    fc1_in = x
    fc1_out = models["float"].fc1(fc1_in)
    by_name = {r["layer"]: r for r in rows}
    assert by_name["fc1"]["output_sqnr_db"] == pytest.approx(sqnr_db(fc1_out, models["ptq"].fc1(fc1_in)), rel=1e-6)
    for row in weight_sqnr(models["ptq"]):
        module = models["ptq"].get_submodule(row["layer"])
        assert row["weight_sqnr_db"] == weight_stats(module.weight, module.weight_quantizer)["sqnr_db"]


def test_token_perturbations_are_seeded_and_hit_the_expected_fraction():
    tokens = torch.arange(10_000) % 50
    generator = torch.Generator().manual_seed(0)
    dropped = substitute_tokens(tokens, 1.0, 50, generator, drop_token=0)
    assert (dropped == 0).all()
    some = substitute_tokens(tokens, 0.1, 50, torch.Generator().manual_seed(0))
    changed = float((some != tokens).float().mean())
    assert 0.08 < changed < 0.11  # 10% replaced, 1/50 of those by the same token: 9.8% expected
    again = perturbation(0.1, seed=3, vocab_size=50)(tokens)
    assert torch.equal(again, perturbation(0.1, seed=3, vocab_size=50)(tokens))
    assert perturbation(0.0)(tokens) is tokens


def test_data_that_does_not_fit_the_model_is_a_clear_error():
    model = FragileMLP()
    with pytest.raises(EvalError, match=r"does not fit the model.*input \[4, 8\]"):
        collect(model, [(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(EvalError, match=r"labels range 0\.\.40 but the model has 32 outputs"):
        collect(model, [(torch.zeros(2, 32), torch.tensor([0, 40]))])


def test_a_language_model_report_has_perplexity_ratio_and_same_top_token_rate():
    from qat.models import TinyLM

    torch.manual_seed(0)
    float_model = TinyLM(vocab_size=16, dim=32, heads=2, seq_len=8).eval()
    spec = QuantSpec(weight=QuantizerConfig(bits=2, granularity="channel"))
    quantized, _ = prepare(copy.deepcopy(float_model), spec)
    tokens = torch.randint(0, 16, (6, 9), generator=torch.Generator().manual_seed(2))
    batches = [(tokens[:, :-1], tokens[:, 1:])]
    report = compare({"float": float_model, "qat": quantized.eval()}, batches, "language_model",
                     noise_levels=[0.0, 0.2], vocab_size=16)
    out, ref = collect(quantized, batches), collect(float_model, batches)
    assert out.logits.shape == (48, 16)  # (B*T, V)
    stage = report["stages"]["qat"]
    assert stage["perplexity"] == metrics.perplexity(out.logits, out.labels)
    assert stage["perplexity_ratio"] == metrics.perplexity_ratio(out.logits, ref.logits, out.labels)
    assert stage["agreement"] == metrics.agreement(out.logits, ref.logits)  # same-top-token rate
    assert report["stages"]["float"]["perplexity_ratio"] == 1.0
    assert report["robustness"]["metric"] == "perplexity" and "slices" not in report


def test_photometric_shifts_by_hand_and_in_the_report_of_an_image_model():
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    brighter = photometric("brightness", 0.25)(images)
    assert torch.equal(brighter, (images + 0.25).clamp(-1, 1))  # saturates at the clean range
    flatter = photometric("contrast", 0.5)(images)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(flatter, mean + 0.5 * (images - mean))  # inside the range: no clamp
    with pytest.raises(ValueError, match="allowed"):
        photometric("hue", 0.1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(8, 3, 4, 4)
    batches = [(x, torch.arange(8) % 3)]
    report = compare({"float": model, "qat": _quantized(model, 4)}, batches, "classification", noise_levels=[0.0])
    shifted = report["robustness_photometric"]
    assert shifted["levels"] == ["brightness +0.25", "brightness -0.25", "contrast x0.5", "contrast x1.5"]
    out = collect(model, batches, transform=photometric("contrast", 1.5))
    assert shifted["stages"]["float"][3] == metrics.accuracy(out.logits, out.labels)
    assert "brightness / contrast" in markdown(report)


def test_robustness_on_the_leading_batches_only_when_asked(toy):
    models, batches, _ = toy
    report = compare(models, batches, "classification", noise_levels=[0.0], robustness_examples=40)
    assert report["robustness_examples"] == 48  # the first batch (48) already holds 40
    first = collect(models["float"], batches[:1])
    assert report["robustness"]["stages"]["float"][0] == metrics.accuracy(first.logits, first.labels)
    assert report["stages"]["float"]["accuracy"] == metrics.accuracy(*_all(models["float"], batches))


def _all(model, batches):
    out = collect(model, batches)
    return out.logits, out.labels
