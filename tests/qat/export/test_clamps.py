"""qat.load drops the clamps a consumer's quantizer performs anyway (qat.export.clamps): exact, and only those.

Every comparison is exact (torch.equal): a dropped clamp changes no float operation the quantizer sees.
"""

from __future__ import annotations

import torch
from torch import nn

import qat
from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.export.clamps import elide_clamps
from qat.points import QuantPoint

SPEC = QuantSpec(weight=QuantizerConfig(bits=4, granularity="channel", init="minmax", scale_dtype="float32"),
                 activation=default_activation_config(8),
                 rules=[QuantRule(type="Conv2d", quantize_activations=False)])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = QuantPoint()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU6()                   # -> fixed [0, 6] point: dropped
        self.act_out = QuantPoint(0.0, 6.0)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.shared = nn.ReLU6()                # its output is used twice: kept
        self.shared_out = QuantPoint(0.0, 6.0)
        self.narrow = nn.Hardtanh(-1.0, 1.0)    # clamps at 1, the point only at 6: kept
        self.narrow_out = QuantPoint(0.0, 6.0)
        self.relu = nn.ReLU()                   # -> learned point calibrated on >= 0 values (zero point 0): dropped
        self.relu_out = QuantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_out(self.act(self.conv(self.inp(x))))
        y = self.shared(self.conv2(x))
        y = self.shared_out(y) + y
        return self.narrow_out(self.narrow(y - 3.0)) + self.relu_out(self.relu(y - 2.0))


class Branchy(Net):
    """The same layers behind data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.sum() > -1e30 else x


def exported(tmp_path, cls=Net):
    torch.manual_seed(0)
    model, _ = qat.prepare(cls(), SPEC)
    qat.calibrate(model, [torch.randn(8, 3, 6, 6) * 3])
    path = tmp_path / "m.safetensors"
    qat.export_model(model.eval(), path)
    return model, path


def test_load_drops_exactly_the_clamps_the_next_quantizer_absorbs_and_stays_bit_exact(tmp_path):
    model, path = exported(tmp_path)
    loaded = qat.load(path, model=Net(), kernel_backend="reference")
    kinds = {name: type(getattr(loaded, name)) for name in ("act", "shared", "narrow", "relu")}
    assert kinds == {"act": nn.Identity, "shared": nn.ReLU6, "narrow": nn.Hardtanh, "relu": nn.Identity}
    probe = torch.randn(4, 3, 6, 6) * 20  # far outside every range: each clamp and quantizer end is hit
    with torch.no_grad():
        assert torch.equal(loaded(probe), model(probe))


def test_a_model_fx_cannot_trace_keeps_its_clamps_and_loads(tmp_path):
    model, path = exported(tmp_path, Branchy)
    loaded = qat.load(path, model=Branchy(), kernel_backend="reference")
    assert isinstance(loaded.act, nn.ReLU6) and isinstance(loaded.relu, nn.ReLU)
    probe = torch.randn(2, 3, 6, 6) * 20
    with torch.no_grad():
        assert torch.equal(loaded(probe), model(probe))


def test_models_without_clamps_or_quantizers_are_left_alone():
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), QuantPoint(0.0, 6.0))  # no quantizer attached
    assert elide_clamps(plain) == [] and isinstance(plain[1], nn.ReLU6)
