"""Golden data in the qat file (`qat.golden`) and `qat verify`: passes on an intact file, fails loudly otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from deploy_models import export_tiny_lm

from qat.cli import main
from qat.export import IntegrityError, MetadataError
from qat.export.format import KEY_CHECKSUMS, KEY_HEADER_DIGEST
from qat.export.golden import KEY_GOLDEN, MAX_OUTPUT_VALUES, decode_golden, encode_golden
from qat.export.manifest import read_golden
from qat.export.save import write_checkpoint
from qat.export.verify import VerificationError, verify


def _rewrite(path: Path, edit_metadata) -> None:
    """Rewrite a file through the writer (fresh checksums and header digest) with edited metadata:
    what a buggy or malicious writer would produce, which the digest alone cannot catch."""
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k not in (KEY_CHECKSUMS, KEY_HEADER_DIGEST)}
    write_checkpoint(path, tensors, edit_metadata(metadata))


@pytest.fixture
def lm_file(tmp_path: Path) -> Path:
    path = tmp_path / "lm.safetensors"
    model = export_tiny_lm(path)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        path.with_suffix(".expected").write_bytes(model(tokens).numpy().tobytes())
    return path


def test_golden_data_round_trips_and_verify_is_exact_on_the_reference_kernel(lm_file: Path) -> None:
    golden = read_golden(lm_file)
    assert golden.output_shape == (2, 16, 64) and golden.complete
    expected = torch.frombuffer(bytearray(lm_file.with_suffix(".expected").read_bytes()), dtype=torch.float32)
    assert torch.equal(golden.output, expected)
    assert torch.equal(golden.inputs[0], torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)))
    report = verify(lm_file, backend="reference")
    assert report.passed and report.deviation == 0.0 and report.bitwise_equal is True


def test_verify_cli_exit_codes_and_loose_tolerance_for_bf16_kernels(lm_file: Path, capsys) -> None:
    assert main(["verify", str(lm_file), "--backend", "reference"]) == 0
    assert "-> OK" in capsys.readouterr().out
    report = verify(lm_file, backend="cpu_int4pack")  # bf16 activations: not bit-exact, within 5e-2
    assert report.passed and 0 < report.deviation < report.tolerance == 5e-2


def test_golden_values_that_do_not_match_their_hash_are_rejected(lm_file: Path, capsys) -> None:
    def shift(metadata: dict) -> dict:
        value = json.loads(metadata[KEY_GOLDEN])
        golden = decode_golden(metadata[KEY_GOLDEN])
        golden.output[5] += 0.01 * golden.output.abs().max()  # 1 % of the largest logit
        value["output"]["data"] = json.loads(encode_golden(golden))["output"]["data"]
        metadata[KEY_GOLDEN] = json.dumps(value)
        return metadata

    _rewrite(lm_file, shift)  # the golden values no longer match their hash: a malformed file
    with pytest.raises(MetadataError, match="do not match 'output_sha256'"):
        read_golden(lm_file)
    assert main(["verify", str(lm_file)]) == 1
    assert "metadata 'qat.golden' is invalid" in capsys.readouterr().err


def test_drift_past_the_tolerance_exits_non_zero(lm_file: Path, capsys) -> None:
    assert main(["verify", str(lm_file), "--backend", "cpu_int4pack", "--tolerance", "1e-6"]) == 1
    err = capsys.readouterr().err
    assert "outputs drifted" in err and "> tolerance 1e-06" in err


def test_golden_metadata_edited_in_place_fails_the_header_digest(lm_file: Path) -> None:
    data = bytearray(lm_file.read_bytes())
    at = data.index(b'output_sha256\\": \\"') + len(b'output_sha256\\": \\"')  # JSON inside the JSON header
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    lm_file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="header fails its SHA-256 check"):
        verify(lm_file)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda g: {**g, "inputs": []}, "'inputs' must be a non-empty list"),
    (lambda g: {**g, "output": {**g["output"], "data": "***"}}, "'data' is not base64"),
    (lambda g: {**g, "output": {**g["output"], "shape": [3]}}, "holds 8192 bytes; dtype float32 and shape"),
    (lambda g: {**g, "extra": 1}, "must be an object with keys"),
    (lambda g: {**g, "output_sha256": "xyz"}, "'output_sha256' must be a lowercase hex"),
])
def test_malformed_golden_metadata_is_a_clear_error(lm_file: Path, edit, message: str) -> None:
    _rewrite(lm_file, lambda m: {**m, KEY_GOLDEN: json.dumps(edit(json.loads(m[KEY_GOLDEN])))})
    with pytest.raises(MetadataError, match=message):
        read_golden(lm_file)


def test_a_weight_tampered_after_export_is_reported_by_name(lm_file: Path, capsys) -> None:
    header_size = int.from_bytes(lm_file.read_bytes()[:8], "little")
    with safetensors.safe_open(lm_file, "pt") as handle:
        names = list(handle.keys())
    assert "qkv.weight_packed" in names
    header = json.loads(lm_file.read_bytes()[8:8 + header_size])
    begin = header["qkv.weight_packed"]["data_offsets"][0]
    data = bytearray(lm_file.read_bytes())
    data[8 + header_size + begin] ^= 0x11
    lm_file.write_bytes(bytes(data))
    assert main(["verify", str(lm_file), "--backend", "reference"]) == 1
    assert "tensor 'qkv.weight_packed' fails its SHA-256 check" in capsys.readouterr().err


def test_files_without_golden_data_still_load_and_verify_says_why(tmp_path: Path) -> None:
    path = tmp_path / "lm.safetensors"
    export_tiny_lm(path)
    _rewrite(path, lambda m: {k: v for k, v in m.items() if k != KEY_GOLDEN})
    assert read_golden(path) is None
    with pytest.raises(VerificationError, match="holds no golden data"):
        verify(path)


def test_large_outputs_keep_a_prefix_and_hash_everything() -> None:
    from qat.export.golden import compute_golden

    golden = compute_golden(torch.nn.Linear(4, 5000), [torch.randn(20, 4)], by="test")
    decoded = decode_golden(encode_golden(golden))
    assert decoded.output.numel() == MAX_OUTPUT_VALUES and not decoded.complete
    assert decoded.output_shape == (20, 5000)


@pytest.fixture
def w2a4_file(tmp_path: Path) -> Path:
    """The default recipe's spec (W2 g128 weights, 4-bit activations) on the digits CNN."""
    from deploy_models import digits_validation, export_digits

    path = tmp_path / "digits.safetensors"
    images, _ = digits_validation()
    export_digits(path, images, weight_bits=2)
    return path


def test_a_file_with_quantized_activations_runs_exact_kernels_and_verifies_bit_identical(w2a4_file, monkeypatch):
    monkeypatch.delenv("QAT_KERNEL_BACKEND", raising=False)
    import qat

    model = qat.load(w2a4_file)
    backends = {type(m).__name__: m.kernel_backend for m in model.modules() if hasattr(m, "weight_spec")}
    assert backends == {"PackedConv2d": "dequant_cached", "PackedLinear": "dequant"}  # convs: dequantized once
    report = verify(w2a4_file)
    assert report.passed and report.tolerance == 1e-4 and report.deviation == 0.0 and report.bitwise_equal
    assert "kernels dequant x4 (auto)" in report.runtime  # 2 convolutions and 2 Linear layers
    assert [str(verify(w2a4_file)) for _ in range(2)] == [str(report)] * 2  # the same every time


def test_a_backend_named_in_the_environment_still_wins_and_the_report_says_so(w2a4_file, monkeypatch):
    monkeypatch.setenv("QAT_KERNEL_BACKEND", "cpu_int4pack")
    report = verify(w2a4_file)
    assert "cpu_int4pack x2" in report.runtime and report.tolerance == 5e-2  # bf16 compute: the loose tolerance


def test_a_weight_only_file_keeps_the_automatic_choice_and_its_tolerance(lm_file, monkeypatch):
    monkeypatch.delenv("QAT_KERNEL_BACKEND", raising=False)
    import qat

    model = qat.load(lm_file)
    assert {m.kernel_backend for m in model.modules() if hasattr(m, "weight_spec")} == {None}
    report = verify(lm_file)
    ran = set(report.runtime.split("kernels ")[1].split(" (")[0].replace(",", "").split()[::2])
    assert report.passed and report.tolerance == (1e-4 if ran <= {"dequant", "reference"} else 5e-2)


def test_verify_takes_a_run_directory_and_says_what_to_do_without_a_file(w2a4_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["verify", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no int4 file (model.safetensors)" in err and "qat export" in err
    w2a4_file.rename(run_dir / "model.safetensors")
    assert main(["verify", str(run_dir)]) == 0
    assert "-> OK" in capsys.readouterr().out
