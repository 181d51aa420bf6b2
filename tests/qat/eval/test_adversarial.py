"""FGSM / PGD (qat.eval.adversarial): exact on a linear model, inside the eps-ball and the input range, seeded,
leaving the model as it was; through a `qat.load` model's straight-through gradients; in the report for image
classifiers only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat
from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.control import set_fake_quant
from qat.eval.adversarial import correct, fgsm, first_examples, pgd, report_section, transfer, white_box
from qat.eval.evaluate import compare
from qat.eval.report import markdown, write_report
from qat.export import export_model
from qat.models import DigitsCNN
from qat.swap import prepare


def _blobs(count: int = 256, features: int = 16, classes: int = 4, seed: int = 0):
    """Gaussian blobs around random class centres: separable, but not by much."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=generator)
    labels = torch.arange(count) % classes
    return centres[labels] + 0.6 * torch.randn(count, features, generator=generator), labels


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained to ~100% on the blobs (60 full-batch Adam steps)."""
    torch.manual_seed(0)
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def test_fgsm_on_a_two_class_linear_model_is_the_hand_derived_step():
    # loss = CE(Wx + b, y): grad_x = (softmax - onehot(y)) @ W = p_other * (w_other - w_y), so the sign is
    # sign(w_other - w_y) whatever the probabilities
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    with torch.no_grad():
        gap = (0.5 + torch.rand(8)) * torch.where(torch.rand(8) < 0.5, -1.0, 1.0)
        model.weight[1] = model.weight[0] + gap
    x = 0.1 * torch.randn(6, 8)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    direction = (model.weight[1 - y] - model.weight[y]).detach().sign()  # (6, 8)
    adv = fgsm(model, x, y, eps=0.25, input_range=(-10.0, 10.0))
    assert torch.equal(adv, x + 0.25 * direction)


def test_perturbations_stay_in_the_eps_ball_and_the_input_range(trained):
    model, x, y = trained
    images = torch.rand(8, 1, 8, 8)
    conv = DigitsCNN(channels=4, hidden=16).eval()
    labels = torch.arange(8) % 10
    for attack_model, inputs, targets in ((model, x[:32], y[:32]), (conv, images, labels)):
        low, high = float(inputs.min()), float(inputs.max())
        for eps in (0.05, 0.3):
            for adv in (fgsm(attack_model, inputs, targets, eps), pgd(attack_model, inputs, targets, eps, steps=5)):
                assert (adv - inputs).abs().max() <= eps + 1e-6
                assert adv.min() >= low and adv.max() <= high
                assert not torch.equal(adv, inputs)


def test_pgd_is_at_least_as_strong_as_fgsm_and_both_lower_accuracy(trained):
    model, x, y = trained
    clean = correct(model, x, y)
    fgsm_hits = correct(model, fgsm(model, x, y, 0.5), y)
    pgd_hits = correct(model, pgd(model, x, y, 0.5, steps=10, seed=0), y)
    assert clean >= 0.95 * len(y)
    assert pgd_hits <= fgsm_hits < clean


def test_pgd_is_deterministic_with_a_seed(trained):
    model, x, y = trained
    first, again = pgd(model, x, y, 0.3, steps=3, seed=7), pgd(model, x, y, 0.3, steps=3, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, pgd(model, x, y, 0.3, steps=3, seed=8))
    assert white_box({"m": model}, [(x, y)], [0.3], steps=3) == white_box({"m": model}, [(x, y)], [0.3], steps=3)


def test_an_attack_changes_no_parameter_buffer_flag_or_mode():
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, hidden=16).train()  # BatchNorm and Dropout: train mode would change things
    model.classifier[1].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    images, labels = torch.rand(8, 1, 8, 8), torch.arange(8)
    pgd(model, images, labels, 0.1, steps=2)
    fgsm(model, images, labels, 0.1)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included


def _loaded_int4(tmp_path, images):
    spec = QuantSpec(weight=QuantizerConfig(init="minmax", group_size=32), activation=default_activation_config(8),
                     rules=[QuantRule(type="Conv2d", granularity="channel")])
    model, _ = qat.prepare(DigitsCNN(channels=4, hidden=32), spec)
    qat.calibrate(model, [images])
    path = tmp_path / "model.safetensors"
    export_model(model.eval(), path, architecture={"_target_": "qat.models.DigitsCNN", "channels": 4, "hidden": 32},
                 recipe_hash="test")
    return qat.load(path)


def test_gradients_flow_through_a_loaded_int4_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    images, labels = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    loaded = _loaded_int4(tmp_path, images)
    x = images.clone().requires_grad_(True)
    loaded(x).logsumexp(-1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0  # round alone has a zero gradient
    monkeypatch.setenv("QAT_KERNEL_BACKEND", "reference")
    with torch.no_grad():  # the straight-through path computes the same forward values
        assert torch.equal(loaded(images.clone().requires_grad_(True)), loaded(images))
    layer = loaded.classifier[1]
    quantizer = layer.input_quantizer
    scale, zero = float(quantizer.scale), float(quantizer.zero_point)
    qmin, qmax = quantizer.spec.qrange
    far = torch.tensor([(qmin - zero - 5) * scale, (qmax - zero + 5) * scale])  # clipped: gradient 0
    near = torch.linspace((qmin - zero + 1) * scale, (qmax - zero - 1) * scale, 126)  # inside: gradient 1
    features = torch.cat([far, near]).requires_grad_(True)
    quantizer(features).sum().backward()
    assert torch.equal(features.grad, torch.cat([torch.zeros(2), torch.ones(126)]))
    grads = {}
    for backend in ("dequant", "cpu_int4pack"):  # int4pack has no backward of its own: the dequant path runs
        monkeypatch.setenv("QAT_KERNEL_BACKEND", backend)
        features = torch.randn(4, 128, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        layer(features).sum().backward()
        grads[backend] = features.grad
    assert torch.equal(grads["dequant"], grads["cpu_int4pack"]) and grads["dequant"].abs().sum() > 0
    adv = pgd(loaded, images, labels, 0.1, steps=2)
    assert 0 < (adv - images).abs().max() <= 0.1 + 1e-6


def _quantized(model, bits=4):
    prepared, _ = prepare(copy.deepcopy(model), QuantSpec(weight=QuantizerConfig(bits=bits, granularity="channel")))
    set_fake_quant(prepared, weights=True)
    return prepared.eval()


def test_the_report_section_for_an_image_classifier(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    models = {"float": model, "ptq": _quantized(model, 2), "qat": _quantized(model)}
    report = compare(models, batches, "classification", noise_levels=[0.0], adversarial_eps=[0.05, 0.2],
                     adversarial_examples=16, adversarial_steps=3)
    adv = report["adversarial"]
    assert adv["examples"] == 16 and adv["eps"] == [0.05, 0.2] and adv["input_range"] == [float(x.min()),
                                                                                         float(x.max())]
    assert set(adv["white_box"]["pgd"]) == set(models) and set(adv["transfer"]["pgd"]) == {"ptq", "qat"}
    taken = first_examples(batches, 16)
    assert [len(b[1]) for b in taken] == [12, 4]
    input_range = tuple(adv["input_range"])
    assert adv["white_box"]["pgd"]["qat"] == white_box({"qat": models["qat"]}, taken, [0.05, 0.2], 3,
                                                       input_range=input_range)["pgd"]["qat"]
    assert adv["transfer"]["fgsm"]["qat"] == transfer(model, {"qat": models["qat"]}, taken, [0.05, 0.2], 3,
                                                      input_range=input_range)["fgsm"]["qat"]
    assert adv["clean"]["float"] == 1.0  # labels are the float model's predictions
    assert report_section(models, batches, [0.05], examples=16, steps=3)["white_box"]["fgsm"]["float"] == \
        [adv["white_box"]["fgsm"]["float"][0]]
    paths = write_report({**report, "name": "toy"}, tmp_path)
    assert paths["adversarial"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown(report)
    assert "## Adversarial robustness" in text and "Transfer from float" in text
    assert f"{adv['white_box']['pgd']['ptq'][1]:.4f}" in text


def test_no_adversarial_section_for_a_token_model_or_when_off():
    from qat.models import TinyLM

    torch.manual_seed(0)
    float_model = TinyLM(vocab_size=16, dim=32, heads=2, seq_len=8).eval()
    tokens = torch.randint(0, 16, (4, 9), generator=torch.Generator().manual_seed(2))
    report = compare({"float": float_model, "qat": _quantized(float_model)}, [(tokens[:, :-1], tokens[:, 1:])],
                     "language_model", noise_levels=[0.0], vocab_size=16, adversarial_eps=[0.1])
    assert "adversarial" not in report and "Adversarial" not in markdown(report)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    off = compare({"float": model}, [(torch.rand(4, 1, 8, 8), torch.arange(4) % 3)], "classification",
                  noise_levels=[0.0])
    assert "adversarial" not in off
