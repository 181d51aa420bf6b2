"""A tiny model trains with W4 (groups of 16) weights and A8 activations: loss falls, scales move, no NaN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantizerConfig, QuantSpec, default_activation_config
from qat.control import calibrate, quantizer_parameters, quantizers
from qat.swap import prepare


def teacher_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=gen)
    teacher = torch.randn(32, 4, generator=gen)
    return x, (x @ teacher).argmax(dim=1)


def test_tiny_model_trains_with_fake_quant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    spec = QuantSpec(weight=QuantizerConfig(bits=4, group_size=16), activation=default_activation_config(8))
    model, report = prepare(model, spec)
    assert len(report.quantized) == 3
    x, y = teacher_data()
    calibrate(model, [x[:64]])
    start = {name: (q.scale.detach().clone(), q.zero_point.detach().clone()) for name, q in quantizers(model)}
    qparams = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if id(p) not in qparams]
    optimizer = torch.optim.Adam([{"params": weights, "lr": 1e-2}, {"params": quantizer_parameters(model), "lr": 1e-3}])
    losses = []
    for step in range(40):
        batch = slice((step % 4) * 64, (step % 4 + 1) * 64)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # mean of the last epoch vs the first
    for name, q in quantizers(model):
        assert torch.isfinite(q.scale).all() and (q.qparams()[0] > 0).all()
        assert not torch.equal(q.scale.detach(), start[name][0]), f"{name} scale did not move"
        if q.config.quantizer == "lsq_plus":
            assert not torch.equal(q.zero_point.detach(), start[name][1]), f"{name} zero point did not move"
    assert all(torch.isfinite(p).all() for p in model.parameters())
