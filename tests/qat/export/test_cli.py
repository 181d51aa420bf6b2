"""`qat export` / `qat inspect` subcommands, `export_checkpoint`, `inspect_checkpoint`, and
rebuilding Hugging Face architectures (with a stand-in `transformers` module)."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch
from conftest import assert_bitwise_equal, make_prepared
from export_test_models import MLP
from torch import nn

import qat
import qat.run.export
from qat import QuantizerConfig, QuantRule, QuantSpec
from qat.cli import build_parser
from qat.export import ExportError, SizeReport, export_model
from qat.export.inspect import inspect_checkpoint
from qat.run.export import export_checkpoint

SPEC = QuantSpec(weight=QuantizerConfig(group_size=32, init="minmax"), rules=[QuantRule(name="fc3", bits=8)])


def seeded_model() -> nn.Module:
    torch.manual_seed(0)
    return make_prepared(MLP(), SPEC, seed=0)


def parser() -> argparse.ArgumentParser:
    return build_parser()  # the `qat` parser: args.func runs the command


@pytest.fixture
def stand_in_build(monkeypatch):
    """qat.run.models.model_from_checkpoint replaced by a stand-in returning a seeded model."""
    seen = []

    def model_from_checkpoint(path):
        seen.append(path)
        return seeded_model(), {"_target_": "export_test_models.MLP"}, "recipe-123"

    monkeypatch.setattr(qat.run.export, "model_from_checkpoint", model_from_checkpoint)
    return seen


def test_export_checkpoint_uses_model_from_checkpoint(stand_in_build, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = tmp_path / "model.safetensors"
    report = export_checkpoint(run_dir, out)
    assert isinstance(report, SizeReport) and stand_in_build == [run_dir]
    loaded = qat.load(out)
    reference = seeded_model()
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), reference(x))
    assert inspect_checkpoint(out).manifest.recipe_hash == "recipe-123"


def test_export_command(stand_in_build, tmp_path, capsys):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"stand-in")
    out = tmp_path / "m.safetensors"
    args = parser().parse_args(["export", str(checkpoint), "-o", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "bits/weight" in printed and out.exists()
    args = parser().parse_args(["export", str(tmp_path / "nowhere.ckpt"), "-o", str(out)])
    assert args.func(args) == 1
    assert "no checkpoint or run directory" in capsys.readouterr().err


def test_export_requires_the_output_option():
    with pytest.raises(SystemExit):
        parser().parse_args(["export", "run"])


def test_inspect_command_reports_layers_sizes_and_integrity(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    export_model(make_prepared(MLP(), SPEC, seed=0), path, architecture={"_target_": "export_test_models.MLP"},
                 recipe_hash="abc123")
    args = parser().parse_args(["inspect", str(path)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for expected in ("format: qat-int4 version 1", f"written by qat {qat.__version__}", "recipe hash: abc123",
                     "export_test_models.MLP", "layers (3):", "plain tensors: 2 (fc1.bias, fc3.bias)", "bits/weight",
                     "integrity: OK (header and 8 tensor SHA-256 checks passed)"):
        assert expected in text, expected
    lines = text.splitlines()
    header = lines.index("layers (3):") + 1
    assert lines[header].split() == ["layer", "type", "stored", "as", "bits", "scheme", "scales", "per", "scale",
                                     "dtype", "shape", "input"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1: header + 4]}
    assert rows["fc1"] == ["fc1", "Linear", "int4", "4", "sym", "group", "of", "32", "float16", "128x64", "-"]
    assert rows["fc3"][:4] == ["fc3", "Linear", "uint8", "8"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert args.func(args) == 1
    assert "integrity: FAILED" in capsys.readouterr().out
    args = parser().parse_args(["inspect", "--no-verify", str(path)])
    assert args.func(args) == 0
    assert "payload not verified" in capsys.readouterr().out


def test_inspect_of_broken_and_missing_files(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x80\x04not really")
    report = inspect_checkpoint(path)
    assert not report.ok and "pickle" in report.error and "FAILED" in str(report)
    args = parser().parse_args(["inspect", str(tmp_path / "none.safetensors")])
    assert args.func(args) == 1
    assert "no file at" in capsys.readouterr().err


def test_inspect_of_a_run_directory_shows_its_int4_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = parser().parse_args(["inspect", str(run_dir)])
    assert args.func(args) == 1
    error = capsys.readouterr().err
    assert "holds no int4 file (model.safetensors)" in error and f"qat export {run_dir} -o " in error
    export_model(make_prepared(MLP(), SPEC, seed=0), run_dir / "model.safetensors")
    assert args.func(args) == 0
    assert f"file: {run_dir / 'model.safetensors'}" in capsys.readouterr().out
    elsewhere = tmp_path / "exported.safetensors"  # recipe.export.path: summary.json names the file
    (run_dir / "model.safetensors").rename(elsewhere)
    (run_dir / "summary.json").write_text(json.dumps({"export": {"path": str(elsewhere)}}))
    assert args.func(args) == 0
    assert f"file: {elsewhere}" in capsys.readouterr().out


def test_export_rejects_bad_arguments(tmp_path):
    model = make_prepared(MLP(), SPEC, seed=0)
    path = tmp_path / "m.safetensors"
    for architecture, message in ((["x"], "must be a dict"), ({"kwargs": 1}, "must be {'_target_'"),
                                  ({"_target_": "a.B", "w": object()}, "JSON-serializable"),
                                  ({"hf_config": {}}, "model_type")):
        with pytest.raises(ExportError, match=message):
            export_model(model, path, architecture=architecture)
    with pytest.raises(ExportError, match="recipe_hash must be a string"):
        export_model(model, path, recipe_hash=123)
    with pytest.raises(ExportError, match="no quantized layers"):
        export_model(MLP(), path)
    assert not path.exists()


# ---- Hugging Face architectures (stand-in transformers) --------------------------------------
class FakeConfig:
    def __init__(self, model_type: str, **options) -> None:
        self.model_type = model_type
        self.__dict__.update(options)


class FakeHFModel(nn.Module):
    def __init__(self, config: FakeConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.inputs, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.hidden, bias=False)
        self.fc3 = nn.Linear(config.hidden, config.outputs)

    forward = MLP.forward


@pytest.fixture
def fake_transformers(monkeypatch):
    module = types.ModuleType("transformers")
    module.AutoConfig = types.SimpleNamespace(for_model=lambda model_type, **options: FakeConfig(model_type, **options))
    module.FakeHFModel = FakeHFModel
    monkeypatch.setitem(sys.modules, "transformers", module)
    return module


def test_hugging_face_architecture_is_rebuilt_from_its_config(fake_transformers, tmp_path):
    config = {"model_type": "fake", "architectures": ["FakeHFModel"], "inputs": 64, "hidden": 128, "outputs": 32}
    model = make_prepared(FakeHFModel(FakeConfig(**config)), SPEC, seed=2)
    path = tmp_path / "hf.safetensors"
    export_model(model, path, architecture={"hf_config": config})
    loaded = qat.load(path)
    assert isinstance(loaded, FakeHFModel)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_bitwise_equal(loaded(x), model(x))


def test_hugging_face_architecture_without_transformers(tmp_path, monkeypatch):
    config = {"model_type": "fake", "architectures": ["FakeHFModel"], "inputs": 64, "hidden": 128, "outputs": 32}
    path = tmp_path / "hf.safetensors"
    model = make_prepared(FakeHFModel(FakeConfig(**config)), SPEC, seed=2)
    export_model(model, path, architecture={"hf_config": config})
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(qat.CheckpointError, match="install transformers"):
        qat.load(path)
