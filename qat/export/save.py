"""`export_model`: a prepared (fake-quant) model -> one deployable .safetensors file.

Example:
    >>> report = export_model(model, "model.safetensors",
    ...                       architecture={"_target_": "my_pkg.Model", "width": 256}, recipe_hash="3f2a...")
    >>> print(report)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import safetensors.torch
import torch
from torch import Tensor, nn

import qat
from qat.conv_bn import FoldedBatchNorm2d, QuantConvBn2d
from qat.export.format import (
    CODES,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_ARCHITECTURE,
    KEY_CHECKSUMS,
    KEY_FOLDED,
    KEY_FORMAT,
    KEY_HEADER_DIGEST,
    KEY_LAYERS,
    KEY_LIBRARY,
    KEY_RECIPE,
    KEY_SPARSITY,
    KEY_TIED,
    KEY_VERSION,
    PACKED,
    REQUIRED_KEYS,
    SCALES,
    TORCH_TO_ST,
    ZEROS,
    ExportError,
    layer_tensor,
)
from qat.export.golden import KEY_GOLDEN, compute_golden, encode_golden
from qat.export.manifest import header_digest, read_manifest
from qat.export.pack import pack_layer
from qat.export.reader import read_header
from qat.export.report import SizeReport, size_report
from qat.export.spec import LayerSpec
from qat.export.state import state_slots
from qat.modules import QuantModule

KEY_PROFILE = "qat.calibration_profile"  # optional: activation / output statistics of validation data (qat.monitor)
WEIGHT_SUFFIXES = (PACKED, CODES, SCALES, ZEROS)  # what layers sharing one quantized table share


def tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 (hex) of a tensor's payload as stored: its raw little-endian bytes in row-major order."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` as safetensors, adding per-tensor checksums and the header digest.

    The file appears atomically (written next to `path`, then renamed over it).
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = dict(metadata)
    metadata[KEY_CHECKSUMS] = json.dumps({name: tensor_sha256(t) for name, t in sorted(tensors.items())})
    index = {name: (TORCH_TO_ST[t.dtype], tuple(t.shape)) for name, t in tensors.items()}
    metadata[KEY_HEADER_DIGEST] = header_digest(metadata, index)
    data = safetensors.torch.save(tensors, metadata=metadata)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def add_metadata(path: str | os.PathLike, entries: dict[str, str]) -> None:
    """Add (or replace) optional metadata keys of an existing qat file, e.g. the calibration profile computed
    on the loaded file: the tensors are kept, checksums and the header digest recomputed, the file replaced
    atomically. Required keys cannot be changed this way."""
    header = read_header(path)
    read_manifest(header)  # a valid qat file, or a CheckpointError naming the problem
    if set(entries) & {*REQUIRED_KEYS}:
        raise ExportError(f"add_metadata changes optional keys only, not {sorted(set(entries) & {*REQUIRED_KEYS})}")
    metadata = {key: value for key, value in header.metadata.items() if key not in (KEY_CHECKSUMS, KEY_HEADER_DIGEST)}
    metadata.update(entries)
    write_checkpoint(path, safetensors.torch.load_file(os.fspath(path)), metadata)


def check_architecture(architecture: Any) -> Optional[dict]:
    """`architecture` must be None, {"_target_": "pkg.module.Class", **json_kwargs} or {"hf_config": {...}}."""
    if architecture is None:
        return None
    if not isinstance(architecture, dict):
        raise ExportError(f"architecture must be a dict, got {type(architecture).__name__}")
    target, hf = architecture.get("_target_"), architecture.get("hf_config")
    if isinstance(target, str) and target and hf is None:
        pass
    elif isinstance(hf, dict) and set(architecture) <= {"hf_config", "hf_source"}:
        if not isinstance(hf.get("model_type"), str):
            raise ExportError("architecture['hf_config'] needs a 'model_type' string (a config.to_dict())")
    else:
        raise ExportError("architecture must be {'_target_': 'pkg.module.Class', **kwargs} or {'hf_config': {...}}")
    try:
        json.dumps(architecture, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ExportError(f"architecture must be JSON-serializable: {err}") from None
    return architecture


def link_integer_biases(model: nn.Module, inputs: Optional[Sequence[Tensor]]) -> None:
    """Layers with `integer_bias` learn which QuantPoint feeds them on a forward (the grid of their bias is that
    point's scale x their weight scale); a model that has run none since it was built (a checkpoint loaded for
    export) runs `inputs` once, in eval mode, or the export is refused."""
    unlinked = [name for name, module in model.named_modules() if isinstance(module, QuantModule)
                and module.integer_bias and "input_point" not in module.__dict__]
    if not unlinked:
        return
    if inputs is None:
        raise ExportError(f"layers {', '.join(unlinked[:4])} round their bias to the integer grid of the QuantPoint "
                          "before them, which a forward records: run the model once (or pass golden_inputs) first")
    was_training = model.training
    with torch.no_grad():
        model.eval()(*inputs)
    model.train(was_training)


def folded_batchnorms(model: nn.Module) -> dict[str, str]:
    """{BN name: conv name} of the BatchNorm layers folded into their conv (qat.conv_bn)."""
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(module.bn)]: name for name, module in model.named_modules() if isinstance(module, QuantConvBn2d)}


def collect_tensors(model: nn.Module) -> tuple[dict[str, LayerSpec], dict[str, Tensor], dict[str, str]]:
    """(layer specs, every tensor to store by file name, ties {alias: stored name}) of a prepared model.
    A conv with a folded BatchNorm stores the folded weight and bias; the BN itself stores nothing."""
    layers: dict[str, LayerSpec] = {}
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    table_owner: dict[int, str] = {}  # id(shared weight) -> the first layer that packed it
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantConvBn2d):
            tensors[f"{name}.bias"] = module.export_bias().detach().clone()
        elif isinstance(module, QuantModule) and module.integer_bias and getattr(module, "bias", None) is not None:
            tensors[f"{name}.bias"] = module.grid_bias(module.bias).detach().clone()  # on the integer grid
        if isinstance(module, QuantModule):
            spec, packed = pack_layer(module, name)
            layers[name] = spec
            owner = table_owner.setdefault(id(getattr(module, "weight", module)), name)  # a QuantPoint has none
            for suffix, tensor in packed.items():
                source = layer_tensor(owner, suffix)
                same = source in tensors and torch.equal(tensors[source], tensor)
                if owner != name and suffix in WEIGHT_SUFFIXES and same:
                    tied[layer_tensor(name, suffix)] = source  # a tied table is stored once
                else:
                    tensors[layer_tensor(name, suffix)] = tensor
    if not layers:
        raise ExportError("the model has no quantized layers; run qat.prepare(model, spec) and train it first")

    def skip(module: nn.Module, attr: str) -> bool:
        if isinstance(module, FoldedBatchNorm2d):
            return True
        if isinstance(module, QuantModule) and attr == "bias" and (isinstance(module, QuantConvBn2d)
                                                                   or module.integer_bias):
            return True  # stored folded or on the integer grid, above
        if not isinstance(module, QuantModule):
            return False
        quantized_weight = attr == "weight" and module.weight_quantizer is not None
        return quantized_weight or attr in ("weight_quantizer", "input_quantizer")

    first_name: dict[int, str] = {}
    for slot in state_slots(model, skip=skip):
        key = id(slot.tensor)
        if key in first_name:
            tied[slot.name] = first_name[key]
            continue
        first_name[key] = slot.name
        if slot.name in tensors:
            raise ExportError(f"tensor name {slot.name!r} of the model collides with a quantized layer's tensor")
        tensors[slot.name] = slot.tensor.detach().clone()
    return layers, tensors, tied


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    architecture: Optional[dict] = None,
    recipe_hash: Optional[str] = None,
    sparsity: Optional[dict] = None,
    golden_inputs: Optional[Sequence[Tensor]] = None,
    profile: Optional[dict] = None,
) -> SizeReport:
    """Write `model` (prepared with `qat.prepare`, trained) to `path` as a qat int4 checkpoint.

    Quantized layers are stored as packed codes, scales and zeros taken from their own
    quantizers (they dequantize bit for bit to the fake-quant weights); every other
    parameter and buffer is stored as a plain tensor. `architecture` tells `qat.load` how
    to rebuild the model: {"_target_": "pkg.module.Class", **json_kwargs} (the class is
    called with the kwargs) or {"hf_config": config.to_dict()} for Hugging Face models;
    None means `qat.load(path, model=...)` must be given a skeleton. `recipe_hash` is
    recorded as given; so is `sparsity`, a JSON-ready pruning report (`qat.prune.remove_masks(model)
    .as_dict()`) stored under `qat.sparsity`. `golden_inputs` (the model's positional inputs,
    a few samples) are run through the model and stored with its output under `qat.golden`
    for `qat verify`. `profile` (a JSON-ready calibration profile, `qat.monitor.profile.build_profile(...)
    .to_json()`) is stored under `qat.calibration_profile` for the reference-free drift monitor.
    Returns the `SizeReport` of the written file.
    """
    architecture = check_architecture(architecture)
    if recipe_hash is not None and not isinstance(recipe_hash, str):
        raise ExportError(f"recipe_hash must be a string, got {type(recipe_hash).__name__}")
    link_integer_biases(model, golden_inputs)
    with torch.no_grad():
        layers, tensors, tied = collect_tensors(model)
    metadata = {
        KEY_FORMAT: FORMAT_NAME,
        KEY_VERSION: str(FORMAT_VERSION),
        KEY_LIBRARY: str(qat.__version__),
        KEY_ARCHITECTURE: json.dumps(architecture, sort_keys=True),
        KEY_RECIPE: recipe_hash or "",
        KEY_LAYERS: json.dumps({name: spec.to_json() for name, spec in layers.items()}, sort_keys=True),
        KEY_TIED: json.dumps(tied, sort_keys=True),
    }
    folded = folded_batchnorms(model)
    if folded:
        metadata[KEY_FOLDED] = json.dumps(folded, sort_keys=True)
    if sparsity is not None:
        if not isinstance(sparsity, dict):
            raise ExportError(f"sparsity must be a dict (a pruning report), got {type(sparsity).__name__}")
        metadata[KEY_SPARSITY] = json.dumps(sparsity, sort_keys=True)
    if golden_inputs is not None:
        metadata[KEY_GOLDEN] = encode_golden(compute_golden(model, golden_inputs, by="fake-quant model, float32"))
    if profile is not None:
        if not isinstance(profile, dict):
            raise ExportError(f"profile must be a dict (a calibration profile's to_json()), "
                              f"got {type(profile).__name__}")
        metadata[KEY_PROFILE] = json.dumps(profile, sort_keys=True, allow_nan=False)
    write_checkpoint(path, tensors, metadata)
    header = read_header(path)
    return size_report(header, read_manifest(header))
