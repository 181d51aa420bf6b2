"""Fuzzing the loader: mutated files raise only the loader's own exceptions (CheckpointError
subclasses); a mutated file that still loads must compute what the original computes."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import safetensors
import torch
from conftest import make_prepared
from export_test_models import MLP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qat
from qat import QuantizerConfig, QuantSpec, default_activation_config
from qat.export import CheckpointError, export_model
from qat.export.format import KEY_LAYERS, KEY_TIED
from qat.export.save import write_checkpoint

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROBE = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=1)
def original() -> tuple[bytes, torch.Tensor, dict, dict]:
    """(file bytes, outputs on PROBE, tensors, metadata) of a small W3A8 model."""
    spec = QuantSpec(weight=QuantizerConfig(bits=3, symmetric=False, quantizer="lsq_plus", group_size=16,
                                            init="minmax"), activation=default_activation_config(8))
    model = make_prepared(MLP(inputs=64, hidden=32, outputs=8), spec, seed=1, calibrate_with=torch.randn(4, 64))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        export_model(model, path, architecture={"_target_": "export_test_models.MLP", "hidden": 32, "outputs": 8})
        with safetensors.safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = dict(handle.metadata())
        with torch.no_grad():
            return path.read_bytes(), qat.load(path)(PROBE), tensors, metadata


def load_or_checkpoint_error(path: Path, faithful: bool = True) -> None:
    """Load `path`: a CheckpointError is fine, any other exception fails; with `faithful`, a file
    that loads must compute what the original computes (its damage was harmless, e.g. whitespace)."""
    try:
        model = qat.load(path)
    except CheckpointError:
        return
    if faithful:
        with torch.no_grad():
            assert torch.equal(model(PROBE), original()[1]), "a mutated file loaded into a different model"


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                                        max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=16))),
    st.tuples(st.just("delete"), st.tuples(st.integers(0, 10**6), st.integers(1, 64))),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def mutate(data: bytes, change) -> bytes:
    kind, value = change
    out = bytearray(data)
    if kind == "flip":
        for position, mask in value:
            out[position % len(out)] ^= mask
    elif kind == "truncate":
        del out[value % len(out):]
    elif kind == "insert":
        position, extra = value
        out[position % (len(out) + 1):position % (len(out) + 1)] = extra
    elif kind == "delete":
        position, count = value
        del out[position % len(out):position % len(out) + count]
    else:
        out[:8] = value.to_bytes(8, "little")
    return bytes(out)


@FUZZ
@given(change=mutation)
def test_mutated_files_raise_only_checkpoint_errors(change):
    data = original()[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(mutate(data, change))
        load_or_checkpoint_error(path)


# Re-signed mutations: checksums and header digest are recomputed, so the spec validation and the
# architecture/tensor matching (not the SHA-256 checks) must catch the damage.
json_text = st.sampled_from([KEY_LAYERS, KEY_TIED])


@settings(max_examples=100, deadline=None)
@given(key=json_text, edits=st.lists(st.tuples(st.integers(0, 10**6), st.characters(codec="ascii")), min_size=1,
                                     max_size=3))
def test_resigned_metadata_mutations_raise_only_checkpoint_errors(key, edits):
    _, _, tensors, metadata = original()
    text = list(metadata[key])
    for position, character in edits:
        text[position % len(text)] = character
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        write_checkpoint(path, tensors, {**metadata, key: "".join(text)})
        load_or_checkpoint_error(path, faithful=False)  # a re-signed file may validly say something else


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(original()[2])), shape=st.lists(st.integers(0, 5), max_size=3),
       dtype=st.sampled_from([torch.uint8, torch.int32, torch.float16, torch.float32, torch.bfloat16]))
def test_resigned_tensor_replacements_raise_only_checkpoint_errors(name, shape, dtype):
    _, _, tensors, metadata = original()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        write_checkpoint(path, {**tensors, name: torch.ones(shape, dtype=dtype)}, metadata)
        load_or_checkpoint_error(path, faithful=False)


def test_the_fuzzed_original_is_a_json_header_file():
    data = original()[0]
    length = int.from_bytes(data[:8], "little")
    assert json.loads(data[8:8 + length])["__metadata__"]["qat.format"] == "qat-int4"
