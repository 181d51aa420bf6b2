"""`qat inspect PATH`: what a checkpoint holds and whether it is intact, without building the model.

PATH is a qat int4 file, a run directory (its int4 file) or an .onnx file written by
`qat export --to onnx` (qat.export.targets.onnx_inspect).

Example:
    >>> report = inspect_checkpoint("model.safetensors")
    >>> print(report)           # format version, layers and their specs, sizes, integrity status
    >>> report.ok
    True
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qat.export.columns import table
from qat.export.format import CheckpointError, layer_tensor
from qat.export.manifest import Manifest, read_manifest
from qat.export.reader import Header, read_header, read_tensors
from qat.export.report import SizeReport, size_report
from qat.export.spec import LayerSpec
from qat.export.values import check_values


@dataclass
class InspectReport:
    """The result of inspecting a file: `ok` is False when any check failed (`error` says which)."""

    path: str
    ok: bool = False
    error: Optional[str] = None
    verified: bool = False
    header: Optional[Header] = None
    manifest: Optional[Manifest] = None
    size: Optional[SizeReport] = None
    plain_tensors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"file: {self.path}"]
        if self.manifest is not None:
            lines += _describe_manifest(self.manifest)
            layers = sorted(self.manifest.layers.items())
            lines += [f"layers ({len(layers)}):",
                      *table(LAYER_COLUMNS, [_layer_row(name, spec) for name, spec in layers])]
            lines.append(f"plain tensors: {len(self.plain_tensors)} ({_first(self.plain_tensors)})")
        if self.size is not None:
            lines.append(str(self.size))
        lines.append(f"integrity: {self.status}")
        return "\n".join(lines)

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"FAILED - {self.error}"
        if not self.verified:
            return "header OK, payload not verified"
        count = len(self.header.tensors) if self.header else 0
        return f"OK (header and {count} tensor SHA-256 checks passed)"


def _sparsity_line(sparsity: Optional[dict]) -> str:
    if not sparsity:
        return "- (not pruned)"
    layers = sparsity.get("layers", {})
    patterns = sum(1 for layer in layers.values() if isinstance(layer, dict) and layer.get("2:4"))
    return f"{sparsity.get('total', float('nan')):.4f} over {len(layers)} layer(s), {patterns} with a 2:4 pattern"


def _describe_manifest(manifest: Manifest) -> list[str]:
    architecture = manifest.architecture
    if architecture is None:
        arch = "none recorded"
    elif "_target_" in architecture:
        kwargs = {k: v for k, v in architecture.items() if k != "_target_"}
        arch = f"{architecture['_target_']}(**{json.dumps(kwargs, sort_keys=True)[:200]})"
    else:
        arch = f"Hugging Face config, model_type={architecture.get('hf_config', {}).get('model_type')!r}"
    return [
        f"format: qat-int4 version {manifest.format_version} (written by qat {manifest.library_version})",
        f"recipe hash: {manifest.recipe_hash or '-'}",
        f"architecture: {arch}",
        f"tied tensors: {len(manifest.tied)}",
        f"sparsity: {_sparsity_line(manifest.sparsity)}",
    ]


LAYER_COLUMNS = ("layer", "type", "stored as", "bits", "scheme", "scales per", "scale dtype", "shape", "input")


def _layer_row(name: str, spec: LayerSpec) -> list[str]:
    """A layer's cells under LAYER_COLUMNS: its weight's storage and quantization, and its input's."""
    w = spec.weight
    if w is None:
        weight = ["float", "-", "-", "-", "-", "-"]
    else:
        groups = f"group of {w.group_size}" if w.granularity == "group" else w.granularity
        weight = [w.layout, str(w.bits), "sym" if w.symmetric else "asym", groups, w.scale_dtype,
                  "x".join(str(size) for size in w.shape)]
    act = "-"
    if spec.input is not None:
        a = spec.input
        act = f"int{a.bits} {'sym' if a.symmetric else 'asym'} per {a.granularity}"
    return [name, spec.type, *weight, act]


def _first(names: list[str], count: int = 6) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def inspect_checkpoint(path: str | os.PathLike, verify: bool = True) -> InspectReport:
    """Read a checkpoint's header and metadata and, with `verify`, check every tensor's SHA-256 and values."""
    report = InspectReport(path=os.fspath(path))
    try:
        report.header = read_header(path)
        report.manifest = read_manifest(report.header)
        report.size = size_report(report.header, report.manifest)
        report.plain_tensors = sorted(set(report.header.tensors) - report.manifest.layer_tensor_names())
        if verify:
            _verify_payload(report.header, report.manifest)
            report.verified = True
    except CheckpointError as err:
        report.error = str(err)
        return report
    report.ok = True
    return report


def _verify_payload(header: Header, manifest: Manifest) -> None:
    owners = {layer_tensor(name, suffix): (suffix, spec)
              for name, spec in manifest.layers.items() for suffix in spec.tensor_shapes()}
    for name, tensor in read_tensors(header, manifest.checksums):
        if name in owners:
            check_values(header.path, name, owners[name][0], owners[name][1], tensor)


RUN_FILE = "model.safetensors"  # the int4 file a training run exports into its directory (qat.run.export)


def run_int4_file(run_dir: Path) -> Optional[Path]:
    """The int4 file of a run directory: the one its summary.json names, else <run_dir>/model.safetensors;
    None when there is none."""
    try:
        named = json.loads((run_dir / "summary.json").read_text()).get("export", {}).get("path")
    except (OSError, ValueError, AttributeError):
        named = None
    for path in ([Path(named)] if named else []) + [run_dir / RUN_FILE]:
        if path.is_file():
            return path
    return None


def int4_path(path: Path) -> Path:
    """`path` itself, or for a run directory its int4 file (`run_int4_file`); a FileNotFoundError saying how to
    write one when the directory has none (`qat inspect` and `qat verify` alike)."""
    if not path.is_dir():
        return path
    found = run_int4_file(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no int4 file ({RUN_FILE}); write one from the run's last "
                                f"checkpoint with `qat export {path} -o {path / RUN_FILE}`")
    return found


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of `qat inspect`: prints the report; 0 if every check passed, 1 otherwise."""
    try:
        path = int4_path(Path(args.file))
    except FileNotFoundError as err:
        print(f"qat inspect: error: {err}", file=sys.stderr)
        return 1
    if not path.is_file():
        print(f"qat inspect: error: no file at {path}", file=sys.stderr)
        return 1
    if path.suffix == ".onnx":
        try:
            from qat.export.targets.onnx_inspect import inspect_onnx
        except ImportError as err:  # the onnx package is optional (pip install qat[onnx])
            print(f"qat inspect: error: reading an .onnx file needs the onnx package ({err}); pip install onnx",
                  file=sys.stderr)
            return 1
        onnx_report = inspect_onnx(path, check=not args.no_verify)
        print(onnx_report)
        return 0 if onnx_report.ok else 1
    report = inspect_checkpoint(path, verify=not args.no_verify)
    print(report)
    return 0 if report.ok else 1
