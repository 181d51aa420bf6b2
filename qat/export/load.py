"""`qat.load`: a qat int4 checkpoint -> an nn.Module ready for inference.

Steps: validate the header and metadata (nothing trusted yet); rebuild the architecture
on the meta device; swap packed layers in for the quantized ones; match every
parameter and buffer of the skeleton to a file tensor (names, shapes) before reading
any payload; then read each tensor once, check its SHA-256 and values, and place it.
Peak memory stays near the file size: no float copy of a quantized weight is made.

Example:
    >>> model = qat.load("model.safetensors", device="cpu", dtype=torch.bfloat16)
    >>> logits = model(tokens)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from qat.conv_bn import fold_into_skeleton
from qat.export.architecture import build_architecture
from qat.export.clamps import elide_clamps
from qat.export.format import KEY_FOLDED, ArchitectureError, TensorMismatchError, layer_tensor
from qat.export.manifest import Manifest, read_manifest
from qat.export.pack import conv_spec
from qat.export.reader import Header, read_header, read_tensors
from qat.export.runtime import PACKED_LAYERS, InputQuantizer, PackedConv2d, _PackedWeight
from qat.export.spec import LayerSpec
from qat.export.state import Slot, state_slots
from qat.export.values import check_values
from qat.kernels import dispatch
from qat.kernels.names import DEQUANT_CACHED
from qat.points import QuantPoint

FLOAT_TYPES = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding, "QuantPoint": QuantPoint}


def load(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = None,
    *,
    model: Optional[nn.Module] = None,
    dynamic_activation_bits: Optional[int] = None,
    kernel_backend: Optional[str] = None,
) -> nn.Module:
    """Load a checkpoint written by `qat.export_model` for inference (eval mode, no gradients).

    Args:
        path: the .safetensors file.
        device: where every tensor goes.
        dtype: floating dtype for the plain tensors (biases, norms, skipped layers) and for
            embedding outputs; None keeps the stored dtypes. Scales and codes never change.
        model: a float skeleton of the architecture to fill instead of rebuilding the one
            the file records (nothing is imported then). It is modified in place.
        dynamic_activation_bits: if set (8 is typical), quantized Linear layers without
            static input quantization fake-quantize their input per token to this many bits.
        kernel_backend: the `qat.kernels.dispatch` backend of the int4 Linear layers; None lets
            dispatch choose (fastest available; not always bit-exact), except in a file with
            quantized activations (or with `dynamic_activation_bits`), which runs the exact
            `dequant` path unless a backend is named here or in $QAT_KERNEL_BACKEND
            (`exact_backend_needed`). "reference" gives the outputs of the fake-quant model bit for bit.

    Raises a `CheckpointError` subclass naming the problem for any bad file.
    """
    path = os.fspath(path)
    if dynamic_activation_bits is not None and dynamic_activation_bits not in range(2, 9):
        raise ValueError(f"dynamic_activation_bits={dynamic_activation_bits!r}; allowed: 2..8 or None")
    header = read_header(path)
    manifest = read_manifest(header)
    skeleton = model if model is not None else build_architecture(manifest.architecture, path)
    fold_skeleton(skeleton, manifest, path)
    install_layers(skeleton, manifest, path, dtype)
    plan = plan_fill(skeleton, header, manifest)
    fill(plan, header, manifest, torch.device(device), dtype)
    automatic = kernel_backend is None and not os.environ.get(dispatch.ENV_VAR)
    if automatic and exact_backend_needed(manifest, dynamic_activation_bits):
        kernel_backend = EXACT_BACKEND
    _configure_packed_layers(skeleton, kernel_backend, dynamic_activation_bits, cache_convs=automatic)
    skeleton.eval().requires_grad_(False)
    elide_clamps(skeleton)  # exact: each dropped clamp is its consumer quantizer's own
    return skeleton


# The backend of files whose layers take quantized inputs: dequantize W in x's dtype, dense matmul (for float32
# x bit-identical to the reference, so to the fake-quant model). `dequant_cached` is as exact and as fast as the
# float layer, at 4 bytes per weight: name it in kernel_backend where memory allows.
EXACT_BACKEND = "dequant"


def exact_backend_needed(manifest: Manifest, dynamic_bits: Optional[int]) -> bool:
    """Whether automatic kernel choice would lose the activations' grid. A quantized input is integer codes
    times a scale; the fast kernels round x (or W) to bf16 or int8, which moves a layer's output by a little
    and so flips some of the next layer's input codes: one layer's small error becomes the next one's large
    error (measured on the default W2A4 digits file: 0.04-0.07 of max |logit| with the fast kernels, against
    ~1e-7 exact). Files with weight-only quantization keep the fast choice."""
    return bool(dynamic_bits) or any(spec.input is not None for spec in manifest.layers.values())


def _configure_packed_layers(model: nn.Module, kernel_backend: Optional[str], dynamic_bits: Optional[int],
                             cache_convs: bool = False) -> None:
    """Backends of the packed layers. `cache_convs` (automatic choice): convolutions dequantize their weight
    once and keep it (`dequant_cached`, exact): there is no int4 conv kernel, and dequantizing at every
    call made the int4 EfficientNet-Lite0 ~2x slower than float on a CPU (benchmarks/models/effnet_fmnist.md)."""
    for module in model.modules():
        if isinstance(module, _PackedWeight):
            module.finish_loading()
            module.kernel_backend = DEQUANT_CACHED if cache_convs and isinstance(module, PackedConv2d) \
                else kernel_backend
            if module.input_quantizer is None and dynamic_bits and module.spec.type == "Linear":
                module.dynamic_activation_bits = dynamic_bits


# ---- skeleton -------------------------------------------------------------------------------
def install_layers(skeleton: nn.Module, manifest: Manifest, path: str, dtype: Optional[torch.dtype]) -> None:
    """Swap a packed layer (meta buffers) in for each quantized layer of the skeleton."""
    for name, spec in manifest.layers.items():
        module = _float_layer(skeleton, name, spec, path)
        if spec.weight is None:
            _attach_input_quantizer(module, spec)
            continue
        kwargs = {"dtype": dtype} if spec.type == "Embedding" else {}
        packed = PACKED_LAYERS[spec.type](module, spec, device="meta", **kwargs)
        parent_name, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent_name) if parent_name else skeleton, child, packed)


def fold_skeleton(skeleton: nn.Module, manifest: Manifest, path: str) -> None:
    """The file's folded BatchNorm layers become nn.Identity, their convs gain the folded bias."""
    try:
        fold_into_skeleton(skeleton, manifest.folded)
    except (AttributeError, TypeError) as err:
        raise ArchitectureError(f"{path}: {KEY_FOLDED} does not fit the architecture: {err}") from None


def _float_layer(skeleton: nn.Module, name: str, spec: LayerSpec, path: str) -> nn.Module:
    where = f"{path}: layer '{name}'"
    try:
        module = skeleton.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if module is None:
        raise ArchitectureError(f"{where} does not exist in the architecture")
    if type(module) is not FLOAT_TYPES[spec.type]:
        raise ArchitectureError(f"{where} is a {type(module).__name__} in the architecture, the file has {spec.type}")
    if spec.weight is not None and tuple(module.weight.shape) != spec.weight.shape:
        raise ArchitectureError(f"{where} has weight shape {list(module.weight.shape)} in the architecture, "
                                f"the file has {list(spec.weight.shape)}")
    if spec.conv is not None and conv_spec(module) != spec.conv:
        raise ArchitectureError(f"{where} has conv settings {conv_spec(module)}, the file has {spec.conv}")
    if spec.input is not None and spec.type == "QuantPoint":
        if spec.input.granularity != "tensor":
            raise ArchitectureError(f"{where} is a QuantPoint; the file quantizes it per {spec.input.granularity}")
    elif spec.input is not None:
        axis, channels = (-1, module.in_features) if spec.type == "Linear" else (1, module.in_channels)
        if spec.input.axis != axis or spec.input.channels not in (0, channels):
            raise ArchitectureError(f"{where} takes {channels} input channels on axis {axis}; the file's input "
                                    f"quantizer has {spec.input.channels} on axis {spec.input.axis}")
    return module


def _apply_input_quantizer(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def _attach_input_quantizer(module: nn.Module, spec: LayerSpec) -> None:
    """A float layer whose input was fake-quantized in training: same fake-quant, as a pre-hook (a QuantPoint
    applies its `input_quantizer` itself: a hook costs ~6 us per call, 60 calls per EfficientNet-Lite0 image)."""
    module.input_quantizer = InputQuantizer(spec.input, device="meta")
    if not isinstance(module, QuantPoint):
        module.register_forward_pre_hook(_apply_input_quantizer)


# ---- matching and filling --------------------------------------------------------------------
@dataclass
class FillPlan:
    """Which skeleton slots each file tensor fills."""

    targets: dict[str, list[Slot]] = field(default_factory=dict)


def plan_fill(skeleton: nn.Module, header: Header, manifest: Manifest) -> FillPlan:
    """Match skeleton slots to file tensors by name (ties by the file's map or the skeleton's sharing)."""
    plan, source_of_tensor, missing = FillPlan(), {}, []
    for slot in state_slots(skeleton):
        source = slot.name if slot.name in header.tensors else manifest.tied.get(slot.name)
        source = source or source_of_tensor.get(id(slot.tensor))
        if source is None:
            missing.append(slot.name)
            continue
        source_of_tensor.setdefault(id(slot.tensor), source)
        plan.targets.setdefault(source, []).append(slot)
    unexpected = sorted(set(header.tensors) - set(plan.targets))
    if missing or unexpected:
        raise TensorMismatchError(f"{header.path}: the file does not fit the architecture: "
                                  f"missing tensors {_few(missing)}, unexpected tensors {_few(unexpected)}")
    for source, slots in plan.targets.items():
        entry = header.tensors[source]
        for slot in slots:
            same_kind = slot.tensor.is_floating_point() == entry.dtype.is_floating_point
            if tuple(slot.tensor.shape) != entry.shape or not same_kind:
                raise TensorMismatchError(
                    f"{header.path}: tensor '{source}' is {entry.st_dtype}{list(entry.shape)} in the file; "
                    f"'{slot.name}' in the architecture is {slot.tensor.dtype}{list(slot.tensor.shape)}"
                )
    return plan


def _few(names: list[str]) -> str:
    return "[]" if not names else "[" + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") + "]"


def fill(
    plan: FillPlan, header: Header, manifest: Manifest, device: torch.device, dtype: Optional[torch.dtype]
) -> None:
    """Read every tensor once (checksum and values checked) and place it in its slots."""
    owners = {layer_tensor(name, suffix): (name, suffix, spec)
              for name, spec in manifest.layers.items() for suffix in spec.tensor_shapes()}
    for name, tensor in read_tensors(header, manifest.checksums):
        owner = owners.get(name)
        if owner is not None:
            check_values(header.path, name, owner[1], owner[2], tensor)
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.to(device)
        _place(plan.targets[name], tensor)


def _place(slots: list[Slot], tensor: Tensor) -> None:
    parameter: Optional[nn.Parameter] = None
    for slot in slots:
        if slot.is_parameter:
            parameter = parameter if parameter is not None else nn.Parameter(tensor, requires_grad=False)
            slot.module._parameters[slot.attr] = parameter
        else:
            slot.module._buffers[slot.attr] = tensor

