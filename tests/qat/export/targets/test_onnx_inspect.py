"""`qat inspect model.onnx`: the metadata qat wrote, the MatMulNBits nodes and the sizes of a converted file."""

from __future__ import annotations

import pytest
from deploy_models import digits_validation, export_digits

from qat.cli import main

onnx = pytest.importorskip("onnx")
from qat.export.targets.onnx import export_onnx  # noqa: E402
from qat.export.targets.onnx_inspect import inspect_onnx  # noqa: E402


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_inspect")
    export_digits(folder / "digits.safetensors", digits_validation()[0])
    export_onnx(folder / "digits.safetensors", folder / "digits.onnx")
    return folder / "digits.onnx"


def test_inspect_shows_what_qat_wrote_into_an_onnx_file(digits_onnx, capsys):
    assert main(["inspect", str(digits_onnx)]) == 0
    text = capsys.readouterr().out
    for expected in ("(ONNX, ", "com.microsoft 1", "converted from: the qat file with SHA-256 ",
                     "inputs: input_0 float32 [", "golden data: 1 input(s) (4x1x8x8)", "MatMulNBits layers (2):",
                     "float layer: features.0 (convolution", "check: OK"):
        assert expected in text, expected
    header = next(line for line in text.splitlines() if line.strip().startswith("layer "))
    assert header.split() == ["layer", "K", "(in)", "N", "(out)", "bits", "block", "accuracy", "level", "bytes",
                              "bits/weight"]
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  classifier.")}
    assert rows["classifier.1"][1:4] == ["1024", "128", "4"] and rows["classifier.4"][1:3] == ["128", "10"]
    report = inspect_onnx(digits_onnx, check=False)
    assert report.ok and report.checked is None and len(report.nbits) == 2
    assert 0 < sum(node.stored_bytes for node in report.nbits) < report.initializer_bytes < report.file_bytes


def test_an_onnx_file_without_qat_metadata_says_so(digits_onnx, tmp_path, capsys):
    model = onnx.load(digits_onnx)
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, plain)
    assert main(["inspect", str(plain)]) == 0
    text = capsys.readouterr().out
    assert "no qat metadata" in text and "golden data: -" in text
