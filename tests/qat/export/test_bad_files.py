"""Bad checkpoints: each kind of damage gives its own CheckpointError subclass, and nothing runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_prepared
from export_test_models import MLP

import qat
from qat import QuantizerConfig, QuantSpec, default_activation_config
from qat.export import (
    ArchitectureError,
    CheckpointError,
    FormatVersionError,
    HeaderError,
    IntegrityError,
    MetadataError,
    NotQatCheckpointError,
    NotSafetensorsError,
    TensorMismatchError,
    TruncatedError,
    export_model,
)
from qat.export.format import KEY_ARCHITECTURE, KEY_LAYERS, KEY_VERSION
from qat.export.save import write_checkpoint

SPEC = QuantSpec(weight=QuantizerConfig(bits=3, symmetric=False, quantizer="lsq_plus", group_size=16, init="minmax"),
                 activation=default_activation_config(8))
ARCHITECTURE = {"_target_": "export_test_models.MLP"}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "model.safetensors"
    model = make_prepared(MLP(), SPEC, seed=0, calibrate_with=torch.randn(4, 64))
    export_model(model, path, architecture=ARCHITECTURE)
    return path


def load_bytes(data: bytes, tmp_path: Path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    return qat.load(path)


def contents(path: Path) -> tuple[dict, dict]:
    with safetensors.safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata())  # noqa: SIM118


def rewrite(good: Path, out: Path, tensors=None, metadata=None) -> Path:
    """A re-signed copy (valid checksums and header digest) with some tensors / metadata changed."""
    original_tensors, original_metadata = contents(good)
    merged = {k: v for k, v in {**original_tensors, **(tensors or {})}.items() if v is not None}
    meta = {k: v for k, v in {**original_metadata, **(metadata or {})}.items() if v is not None}
    write_checkpoint(out, merged, meta)
    return out


def header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_the_good_file_loads(good_file):
    assert isinstance(qat.load(good_file), MLP)


@pytest.mark.parametrize("sixteenths", range(1, 16))
def test_truncated_files(good_file, tmp_path, sixteenths):
    data = good_file.read_bytes()
    with pytest.raises(TruncatedError, match=r"truncated|too short|ends inside"):
        load_bytes(data[: len(data) * sixteenths // 16], tmp_path)


def test_empty_and_tiny_files(tmp_path):
    for data in (b"", b"\x10\x00"):
        with pytest.raises(TruncatedError, match="too short"):
            load_bytes(data, tmp_path)


def test_every_flipped_header_byte_is_caught(good_file, tmp_path):
    data = good_file.read_bytes()
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(data)
    kinds = set()
    with open(path, "r+b") as handle:
        for position in range(header_length(data)):
            for value in (data[position] ^ 0x01, data[position]):  # flip in place, load, restore
                handle.seek(position)
                handle.write(bytes([value]))
                handle.flush()
                if value != data[position]:
                    with pytest.raises(CheckpointError) as caught:
                        qat.load(path)
                    kinds.add(type(caught.value))
    assert {HeaderError, IntegrityError, NotSafetensorsError} <= kinds
    assert path.read_bytes() == data


def test_flipped_metadata_value_fails_the_header_digest(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    position = data.index(b'\\"bits\\": 3')  # inside the qat.layers JSON string
    data[position + len(b'\\"bits\\": ')] = ord("4")
    with pytest.raises(IntegrityError, match="header fails its SHA-256"):
        load_bytes(bytes(data), tmp_path)


def test_flipped_payload_bytes_name_the_tensor(good_file, tmp_path):
    data = good_file.read_bytes()
    start = header_length(data)
    with safetensors.safe_open(good_file, framework="pt") as handle:
        names = list(handle.keys())
    header = json.loads(data[8:start])
    for step in range(16):
        position = start + (len(data) - start) * step // 16
        offset = position - start
        owner = next(n for n in names if header[n]["data_offsets"][0] <= offset < header[n]["data_offsets"][1])
        corrupted = bytearray(data)
        corrupted[position] ^= 0x80
        with pytest.raises(IntegrityError, match=f"tensor '{owner}' fails its SHA-256"):
            load_bytes(bytes(corrupted), tmp_path)


def test_misshaped_tensors(good_file, tmp_path):
    scales, _ = contents(good_file)
    bad_scales = scales["fc1.weight_scales"][:, :2].contiguous()
    expected = r"'fc1.weight_scales' is F16\[128, 2\]; the layer spec needs F16\[128, 4\]"
    with pytest.raises(TensorMismatchError, match=expected):
        qat.load(rewrite(good_file, tmp_path / "a.safetensors", {"fc1.weight_scales": bad_scales}))
    with pytest.raises(TensorMismatchError, match=r"'fc1.bias' is F32\[127\] in the file"):
        qat.load(rewrite(good_file, tmp_path / "b.safetensors", {"fc1.bias": torch.zeros(127)}))
    wrong_dtype = scales["fc1.weight_zeros"].to(torch.int32)
    with pytest.raises(TensorMismatchError, match=r"'fc1.weight_zeros' is I32"):
        qat.load(rewrite(good_file, tmp_path / "c.safetensors", {"fc1.weight_zeros": wrong_dtype}))


def test_missing_and_unexpected_tensors(good_file, tmp_path):
    with pytest.raises(TensorMismatchError, match=r"missing tensors \[fc3.bias\]"):
        qat.load(rewrite(good_file, tmp_path / "a.safetensors", {"fc3.bias": None}))
    with pytest.raises(TensorMismatchError, match=r"tensor 'fc2.weight_packed' of layer 'fc2' is missing"):
        qat.load(rewrite(good_file, tmp_path / "b.safetensors", {"fc2.weight_packed": None}))
    with pytest.raises(TensorMismatchError, match=r"unexpected tensors \[extra\]"):
        qat.load(rewrite(good_file, tmp_path / "c.safetensors", {"extra": torch.zeros(3)}))


@pytest.mark.parametrize(("version", "message"), [("2", "newer than this qat reads"), ("0", "unknown format version"),
                                                  ("1.0", "unknown format version"), (None, "unknown format version")])
def test_unknown_or_newer_format_versions(good_file, tmp_path, version, message):
    path = rewrite(good_file, tmp_path / "v.safetensors", metadata={KEY_VERSION: version})
    with pytest.raises(FormatVersionError, match=message):
        qat.load(path)


def test_plain_safetensors_file_is_not_a_qat_checkpoint(tmp_path):
    path = tmp_path / "hf.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, path, metadata={"format": "pt"})
    with pytest.raises(NotQatCheckpointError, match="not a qat checkpoint"):
        qat.load(path)


class _TouchOnUnpickle:
    """Unpickling this creates a file: proof that a loader executed the payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_files_renamed_to_safetensors_run_nothing(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(live)))
    assert live.exists()  # the payload is live
    marker = tmp_path / "executed"
    for protocol in (2, 4, 5):
        with pytest.raises(NotSafetensorsError, match=r"a pickle \(protocol"):
            load_bytes(pickle.dumps(_TouchOnUnpickle(marker), protocol=protocol), tmp_path)
    path = tmp_path / "torch.safetensors"
    torch.save({"weight": torch.zeros(2), "evil": _TouchOnUnpickle(marker)}, path)
    with pytest.raises(NotSafetensorsError, match="zip archive"):
        qat.load(path)
    with pytest.raises(NotSafetensorsError, match="not a safetensors file"):
        load_bytes(pickle.dumps(_TouchOnUnpickle(marker), protocol=0), tmp_path)
    assert not marker.exists()


def test_random_bytes_and_bad_json(tmp_path):
    with pytest.raises(NotSafetensorsError):
        load_bytes(b"hello, this is not a checkpoint at all", tmp_path)
    for header in (b"[1, 2]", b'{"a": 1, "a": 2}', b'{"x": NaN}', b"{\xff}", b"[" * 5000 + b"]" * 5000):
        text = header if header.startswith(b"{") else b"{" + header[1:]
        with pytest.raises(HeaderError):
            load_bytes(len(text).to_bytes(8, "little") + text, tmp_path)
    with pytest.raises(FileNotFoundError):
        qat.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(("tensor", "value", "message"), [
    ("fc1.weight_scales", 0.0, "not finite and positive"),
    ("fc1.weight_scales", float("nan"), "not finite and positive"),
    ("fc2.weight_packed", 0x8F, "holds 1 code\\(s\\) above 7"),
    ("fc2.weight_zeros", 9, "holds 1 code\\(s\\) above 7"),
    ("fc3.input_quantizer.zero_point", 300, r"1 zero point\(s\) outside \[0, 255\]"),
    ("fc1.input_quantizer.scale", -1.0, "not finite and positive"),
])
def test_invalid_values_with_valid_checksums(good_file, tmp_path, tensor, value, message):
    tensors, _ = contents(good_file)
    changed = tensors[tensor].clone()
    changed.view(-1)[0] = value
    with pytest.raises(TensorMismatchError, match=message):
        qat.load(rewrite(good_file, tmp_path / "v.safetensors", {tensor: changed}))


@pytest.mark.parametrize(("change", "message"), [
    (lambda layers: layers["fc1"]["weight"].update(bits="3"), "'bits'='3' is not an integer"),
    (lambda layers: layers["fc1"]["weight"].update(extra=1), r"unknown keys \['extra'\]"),
    (lambda layers: layers["fc1"]["weight"].update(group_size=24), "does not divide 64 columns"),
    (lambda layers: layers["fc1"]["weight"].update(layout="uint8"), "is not the one defined"),
    (lambda layers: layers["fc1"].update(type="Conv2d"), "'conv' must be given exactly for Conv2d"),
    (lambda layers: layers.update(fc9=None), "expected a JSON object"),
])
def test_malformed_layer_specs(good_file, tmp_path, change, message):
    _, metadata = contents(good_file)
    layers = json.loads(metadata[KEY_LAYERS])
    change(layers)
    with pytest.raises(MetadataError, match=message):
        qat.load(rewrite(good_file, tmp_path / "m.safetensors", metadata={KEY_LAYERS: json.dumps(layers)}))


@pytest.mark.parametrize(("architecture", "message"), [
    ({"_target_": "subprocess.run", "args": ["touch", "x"]}, "not an nn.Module class; refusing to call it"),
    ({"_target_": "export_test_models.NotAModel"}, "not an nn.Module class"),
    ({"_target_": "no_such_package_xyz.Model"}, "cannot be imported"),
    ({"_target_": "os.path..join"}, "not an import path"),
    ({"_target_": "export_test_models.MLP", "bogus": 1}, "building the model on the meta device failed"),
    ({"_target_": "export_test_models.MLP", "hidden": 96}, r"has weight shape \[96, 64\]"),
    ({"_target_": "export_test_models.ConvNet"}, "layer 'fc1' does not exist"),
    ({"something": "else"}, "must hold '_target_' or 'hf_config'"),
])
def test_architectures_that_cannot_be_rebuilt(good_file, tmp_path, architecture, message):
    path = rewrite(good_file, tmp_path / "a.safetensors", metadata={KEY_ARCHITECTURE: json.dumps(architecture)})
    with pytest.raises(ArchitectureError, match=message):
        qat.load(path)
    assert not (Path.cwd() / "x").exists()
