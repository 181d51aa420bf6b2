"""`qat inspect FILE`: what a checkpoint holds and whether it is intact, without building the model.

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
            lines += ["layers:", *(_layer_line(name, spec) for name, spec in sorted(self.manifest.layers.items()))]
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


def _layer_line(name: str, spec: LayerSpec) -> str:
    w = spec.weight
    if w is None:
        weight = "weight float"
    else:
        sym = "sym" if w.symmetric else "asym"
        groups = f"g{w.group_size}" if w.granularity == "group" else w.granularity
        weight = f"{w.layout} int{w.bits} {sym} {groups} scales={w.scale_dtype} shape={list(w.shape)}"
    act = "-"
    if spec.input is not None:
        a = spec.input
        act = f"int{a.bits} {'sym' if a.symmetric else 'asym'} {a.granularity}"
    return f"  {name:<32} {spec.type:<10} {weight}  input: {act}"


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


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of `qat inspect`: prints the report; 0 if every check passed, 1 otherwise."""
    if not Path(args.file).is_file():
        print(f"qat inspect: error: no file at {args.file}", file=sys.stderr)
        return 1
    report = inspect_checkpoint(args.file, verify=not args.no_verify)
    print(report)
    return 0 if report.ok else 1
