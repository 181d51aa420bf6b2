"""Packing: golden bytes pin the nibble order and the formula; exported weights dequantize
bit for bit to the fake-quant weights over many configs, seeds and layer types."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
from conftest import assert_bitwise_equal, perturb_qparams
from qat.kernels.reference import dequantize_int4, pack_int4, unpack_int4
from torch import nn

from qat import LayerConfig, QuantConv2d, QuantEmbedding, QuantizerConfig, QuantLinear
from qat.export.format import CODES, PACKED, SCALES, ZEROS, ExportError
from qat.export.pack import dequantize_weight, pack_layer

# ---- golden vectors ------------------------------------------------------------------------
# The worked example of docs/FORMAT.md (test_format_doc.py checks the doc holds these numbers).
SYMMETRIC_WEIGHT = [[-1.0, 0.5, 1.25, 3.9], [0.3, -0.75, -2.0, 0.0]]
SYMMETRIC_SCALES = [0.5, 0.25]
SYMMETRIC_PACKED = bytes([0x96, 0xFA, 0x59, 0x80])  # row 0: codes 6 9 | 10 15; row 1: 9 5 | 0 8
SYMMETRIC_SCALE_BYTES = bytes([0x00, 0x38, 0x00, 0x34])  # float16 0.5, 0.25, little-endian
SYMMETRIC_DEQUANTIZED = [[-1.0, 0.5, 1.0, 3.5], [0.25, -0.75, -2.0, 0.0]]

ASYMMETRIC_WEIGHT = [[0.0, 0.3, -0.2, 1.0]]
ASYMMETRIC_PACKED = bytes([0x63, 0xD1])  # codes 3 6 | 1 13
ASYMMETRIC_SCALE_BYTES = bytes([0x66, 0x2E])  # float16 0.1 -> 0.0999755859375
ASYMMETRIC_ZERO_BYTES = bytes([3])
ASYMMETRIC_DEQUANTIZED = [[0.0, 0.2999267578125, -0.199951171875, 0.999755859375]]


def golden_symmetric_layer() -> QuantLinear:
    linear = nn.Linear(4, 2, bias=False)
    linear.weight.data = torch.tensor(SYMMETRIC_WEIGHT)
    config = QuantizerConfig(bits=4, granularity="channel", quantizer="lsq", scale_dtype="float16")
    layer = QuantLinear.from_float(linear, LayerConfig(weight=config, activation=None))
    layer.weight_quantizer.scale.data = torch.tensor(SYMMETRIC_SCALES)
    return layer.eval()


def golden_asymmetric_layer() -> QuantLinear:
    linear = nn.Linear(4, 1, bias=False)
    linear.weight.data = torch.tensor(ASYMMETRIC_WEIGHT)
    config = QuantizerConfig(bits=4, symmetric=False, granularity="channel", quantizer="lsq_plus",
                             scale_dtype="float16")
    layer = QuantLinear.from_float(linear, LayerConfig(weight=config, activation=None))
    layer.weight_quantizer.scale.data = torch.tensor([0.1])
    layer.weight_quantizer.zero_point.data = torch.tensor([3.0])
    return layer.eval()


def golden_model() -> nn.Sequential:
    return nn.Sequential(OrderedDict(fc=golden_symmetric_layer(), fc_asym=golden_asymmetric_layer()))


def test_pack_int4_puts_the_even_code_in_the_low_nibble():
    codes = torch.tensor([[6, 9, 10, 15], [9, 5, 0, 8]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert bytes(packed.flatten().tolist()) == SYMMETRIC_PACKED
    assert torch.equal(unpack_int4(packed), codes)


def test_golden_symmetric_layer_bytes_and_values():
    layer = golden_symmetric_layer()
    spec, tensors = pack_layer(layer, "fc")
    assert set(tensors) == {PACKED, SCALES}  # symmetric: no zeros stored (implied 8)
    assert bytes(tensors[PACKED].flatten().tolist()) == SYMMETRIC_PACKED
    assert bytes(tensors[SCALES].contiguous().view(torch.uint8).flatten().tolist()) == SYMMETRIC_SCALE_BYTES
    assert (spec.weight.group_size, spec.weight.implied_zero) == (4, 8)
    expected = torch.tensor(SYMMETRIC_DEQUANTIZED)
    assert torch.equal(dequantize_weight(spec.weight, tensors), expected)
    assert torch.equal(dequantize_int4(tensors[PACKED], tensors[SCALES], None, 4), expected)


def test_golden_asymmetric_layer_bytes_and_values():
    spec, tensors = pack_layer(golden_asymmetric_layer(), "fc_asym")
    assert bytes(tensors[PACKED].flatten().tolist()) == ASYMMETRIC_PACKED
    assert bytes(tensors[SCALES].view(torch.uint8).flatten().tolist()) == ASYMMETRIC_SCALE_BYTES
    assert bytes(tensors[ZEROS].flatten().tolist()) == ASYMMETRIC_ZERO_BYTES
    assert torch.equal(dequantize_weight(spec.weight, tensors), torch.tensor(ASYMMETRIC_DEQUANTIZED))


# ---- fidelity over configs -------------------------------------------------------------------
MODES = [  # (symmetric, signed, quantizer)
    (True, None, "lsq"),
    (False, None, "lsq_plus"),
    (False, None, "lsq"),
    (True, False, "lsq"),
    (False, True, "lsq_plus"),
    (True, None, "observer"),
    (False, None, "observer"),
]
GRANULARITIES = [("group", 16), ("group", 32), ("group", 64), ("channel", 0), ("tensor", 0)]
SCALE_DTYPES = ["float16", "bfloat16", "float32"]
CONFIGS = [
    QuantizerConfig(bits=bits, symmetric=sym, signed=signed, quantizer=kind, granularity=gran,
                    group_size=group or 128, scale_dtype=SCALE_DTYPES[index % 3], init=("mse", "minmax")[index % 2])
    for index, (bits, (sym, signed, kind), (gran, group)) in enumerate(
        itertools.product(range(2, 9), MODES, GRANULARITIES))
]


def make_float_layer(kind: str, generator: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    if kind == "Linear":
        return nn.Linear(64, 24)
    if kind == "Conv2d":
        return nn.Conv2d(16, 12, 2)  # K = 16 * 2 * 2 = 64
    layer = nn.Embedding(20, 64)
    with torch.no_grad():
        layer.weight[3].zero_()  # a constant row: the smallest-scale path
    return layer


QUANT_CLASSES = {"Linear": QuantLinear, "Conv2d": QuantConv2d, "Embedding": QuantEmbedding}


def assert_exact_export(layer) -> None:
    spec, tensors = pack_layer(layer, "layer")
    expected = layer.weight_quantizer(layer.weight).detach()
    actual = dequantize_weight(spec.weight, tensors).to(layer.weight.dtype)
    assert_bitwise_equal(actual, expected)
    codes = tensors.get(CODES, tensors.get(PACKED))
    assert codes.dtype == torch.uint8 and tensors[SCALES].dtype == layer.weight_quantizer.config.torch_scale_dtype


@pytest.mark.parametrize("kind", ["Linear", "Conv2d", "Embedding"])
def test_exported_weights_dequantize_to_fake_quant_weights(kind):
    generator = torch.Generator().manual_seed(len(kind))
    for index, config in enumerate(CONFIGS):
        layer = QUANT_CLASSES[kind].from_float(make_float_layer(kind, generator), LayerConfig(config, None))
        perturb_qparams(nn.Sequential(layer), generator)
        try:
            assert_exact_export(layer.eval())
        except AssertionError as err:
            raise AssertionError(f"config #{index} {config}: {err}") from None


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_low_precision_weights_export_exactly(weight_dtype, granularity):
    generator = torch.Generator().manual_seed(7)
    for bits, symmetric, scale_dtype in itertools.product((3, 4, 8), (True, False), SCALE_DTYPES):
        config = QuantizerConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=32,
                                 quantizer="lsq" if symmetric else "lsq_plus", scale_dtype=scale_dtype)
        layer = QuantLinear.from_float(nn.Linear(64, 16).to(weight_dtype), LayerConfig(config, None))
        perturb_qparams(nn.Sequential(layer), generator)
        assert_exact_export(layer.eval())


def test_trained_scales_and_zero_points_export_exactly():
    torch.manual_seed(3)
    config = QuantizerConfig(bits=3, symmetric=False, quantizer="lsq_plus", group_size=16)
    layer = QuantLinear.from_float(nn.Linear(32, 16), LayerConfig(config, None))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(20):
        loss = (layer(torch.randn(8, 32)) - torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(layer.weight_quantizer.zero_point, layer.weight_quantizer.zero_point.round())
    assert_exact_export(layer.eval())


@pytest.mark.parametrize(("bits", "columns", "layout"), [(2, 64, "int4"), (3, 64, "int4"), (4, 64, "int4"),
                                                         (5, 64, "uint8"), (8, 64, "uint8"), (4, 27, "uint8")])
def test_layout_follows_bits_and_column_parity(bits, columns, layout):
    config = QuantizerConfig(bits=bits, granularity="channel")
    layer = QuantLinear.from_float(nn.Linear(columns, 6), LayerConfig(config, None)).eval()
    spec, tensors = pack_layer(layer, "fc")
    assert spec.weight.layout == layout
    data = tensors[PACKED if layout == "int4" else CODES]
    assert data.shape == ((6, columns // 2) if layout == "int4" else (6, columns))
    assert int(unpack_int4(data).max() if layout == "int4" else data.max()) <= 2**bits - 1
    assert_exact_export(layer)


def test_symmetric_layers_store_no_zeros_and_asymmetric_ones_do():
    for symmetric, signed, implied in ((True, True, 8), (True, False, 0)):
        config = QuantizerConfig(bits=4, symmetric=symmetric, signed=signed, group_size=16)
        spec, tensors = pack_layer(QuantLinear.from_float(nn.Linear(32, 4), LayerConfig(config, None)), "fc")
        assert ZEROS not in tensors and not spec.weight.zeros and spec.weight.implied_zero == implied
    config = QuantizerConfig(bits=4, symmetric=False, group_size=16)
    spec, tensors = pack_layer(QuantLinear.from_float(nn.Linear(32, 4), LayerConfig(config, None)), "fc")
    assert tensors[ZEROS].shape == (4, 2) and tensors[ZEROS].dtype == torch.uint8 and spec.weight.zeros


def test_disabled_weight_quantizer_and_nonfinite_weights_refuse_export():
    layer = QuantLinear.from_float(nn.Linear(32, 4), LayerConfig(QuantizerConfig(group_size=16), None))
    layer.weight_quantizer.disable()
    with pytest.raises(ExportError, match="weight quantizer is disabled"):
        pack_layer(layer, "fc")
    layer.weight_quantizer.enable()
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match="non-finite"):
        pack_layer(layer, "fc")
