"""docs/FORMAT.md against the code: the worked example's numbers and bytes are what export
writes, they equal the golden vectors, and every name the format defines is documented."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import test_pack
import torch
from qat.kernels.reference import unpack_int4
from torch import nn

import qat
from qat import LayerConfig, QuantizerConfig, QuantLinear
from qat.export import export_model, format
from qat.export.reader import read_header
from qat.functional import quantize

DOC = Path(__file__).resolve().parents[3] / "docs" / "FORMAT.md"


def worked_example() -> dict:
    text = DOC.read_text()
    match = re.search(r"<!-- worked-example -->\s*```json\n(.*?)```", text, re.S)
    assert match, "FORMAT.md lost its worked-example block"
    return json.loads(match.group(1))


def build_layer(layer: dict) -> QuantLinear:
    weight = torch.tensor(layer["weight"])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    config = QuantizerConfig(bits=layer["bits"], signed=layer["signed"], symmetric=layer["symmetric"],
                             granularity="channel", quantizer=layer["quantizer"], scale_dtype=layer["scale_dtype"])
    quantized = QuantLinear.from_float(linear, LayerConfig(weight=config, activation=None))
    quantized.weight_quantizer.scale.data = torch.tensor(layer["scale"])
    quantized.weight_quantizer.zero_point.data = torch.tensor(layer["zero_point"], dtype=torch.float32)
    return quantized.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    example = worked_example()
    model = nn.Sequential(OrderedDict((name, build_layer(layer)) for name, layer in example.items()))
    path = tmp_path_factory.mktemp("doc") / "example.safetensors"
    export_model(model, path)
    skeleton = nn.Sequential(OrderedDict((name, nn.Linear(len(layer["weight"][0]), len(layer["weight"]), bias=False))
                                         for name, layer in example.items()))
    return example, model, path, qat.load(path, model=skeleton)


def test_worked_example_codes_bytes_and_values(exported):
    example, model, path, loaded = exported
    header = read_header(path)
    data = path.read_bytes()
    assert set(header.tensors) == {name for layer in example.values() for name in layer["tensors"]}
    for name, layer in example.items():
        quantizer = getattr(model, name).weight_quantizer
        scale, zero = quantizer.qparams()
        codes = quantize(torch.tensor(layer["weight"]), scale[:, None], zero[:, None], quantizer.config.qmin,
                         quantizer.config.qmax)
        assert codes.tolist() == layer["codes"]
        assert (codes - quantizer.config.qmin).tolist() == layer["stored_codes"]
        for tensor, expected in layer["tensors"].items():
            entry = header.tensors[tensor]
            raw = data[header.data_start + entry.begin:header.data_start + entry.end]
            assert (entry.st_dtype, list(entry.shape), raw.hex(" ")) == (expected["dtype"], expected["shape"],
                                                                         expected["hex"])
        assert unpack_int4(getattr(loaded, name).weight_packed).tolist() == layer["stored_codes"]
        assert getattr(loaded, name).dequantized_weight().tolist() == layer["dequantized"]
        assert quantizer(getattr(model, name).weight).tolist() == layer["dequantized"]


def test_worked_example_equals_the_golden_vectors():
    example = worked_example()
    symmetric, asymmetric = example["fc"], example["fc_asym"]
    assert symmetric["weight"] == test_pack.SYMMETRIC_WEIGHT and symmetric["scale"] == test_pack.SYMMETRIC_SCALES
    assert bytes.fromhex(symmetric["tensors"]["fc.weight_packed"]["hex"]) == test_pack.SYMMETRIC_PACKED
    assert bytes.fromhex(symmetric["tensors"]["fc.weight_scales"]["hex"]) == test_pack.SYMMETRIC_SCALE_BYTES
    assert symmetric["dequantized"] == test_pack.SYMMETRIC_DEQUANTIZED
    assert asymmetric["weight"] == test_pack.ASYMMETRIC_WEIGHT
    assert bytes.fromhex(asymmetric["tensors"]["fc_asym.weight_packed"]["hex"]) == test_pack.ASYMMETRIC_PACKED
    assert bytes.fromhex(asymmetric["tensors"]["fc_asym.weight_scales"]["hex"]) == test_pack.ASYMMETRIC_SCALE_BYTES
    assert bytes.fromhex(asymmetric["tensors"]["fc_asym.weight_zeros"]["hex"]) == test_pack.ASYMMETRIC_ZERO_BYTES
    assert asymmetric["dequantized"] == test_pack.ASYMMETRIC_DEQUANTIZED


def test_every_format_name_is_documented():
    text = DOC.read_text()
    names = [value for key, value in vars(format).items()
             if key.startswith("KEY_") or key in ("PACKED", "CODES", "SCALES", "ZEROS", "INPUT_SCALE", "INPUT_ZERO")]
    names += [format.FORMAT_NAME, f"version {format.FORMAT_VERSION}", *format.LAYER_TYPES]
    errors = [cls for cls in vars(format).values() if isinstance(cls, type) and issubclass(cls, format.CheckpointError)]
    names += [cls.__name__ for cls in errors]
    missing = [name for name in names if name not in text]
    assert not missing, f"FORMAT.md does not mention {missing}"
