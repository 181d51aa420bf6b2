"""`qat verify FILE`: rerun the golden inputs stored in a file on this machine, runtime and kernel.

The deviation is max |output - golden| / max |golden| (relative to the largest golden
output magnitude, so one threshold fits logits of any scale). Default tolerances:

    EXACT_TOLERANCE = 1e-4   float32 paths (kernels `reference`, `dequant`, `dequant_cached`; ONNX Runtime
                             accuracy_level 0/1): the file's numbers are computed with the same operations,
                             only float32 summation order may differ across machines and BLAS libraries
                             (measured: 0 on the exporting machine, <= 4e-7 for ONNX Runtime)
    LOOSE_TOLERANCE = 5e-2   kernels that round activations to bf16 / fp16 / int8 (`cpu_int4pack`,
                             `cpu_bf16_cached`, Triton; ONNX accuracy_level 2-4) when the automatic choice
                             picked one of them (measured: see docs/FORMAT.md section 3)

Without `--backend` the tolerance follows the kernels that actually ran (the report names them): exact
when every layer ran an exact path (as files with quantized activations do by default: `qat.load`).

A failure (deviation past the tolerance, a file that fails its SHA-256 checks, golden data
that is missing or malformed) exits non-zero with a message naming the problem.

Example:
    $ qat verify model.safetensors --backend reference
    $ qat verify model.onnx
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from qat.export.golden import KEY_GOLDEN, Golden, decode_golden, float32_sha256, output_tensor
from qat.export.inspect import int4_path
from qat.export.load import load
from qat.export.manifest import read_golden
from qat.export.runtime import _PackedWeight

EXACT_TOLERANCE = 1e-4
LOOSE_TOLERANCE = 5e-2
EXACT_BACKENDS = ("reference", "dequant", "dequant_cached")


class VerificationError(ValueError):
    """A file cannot be verified (no golden data) or its outputs drifted past the tolerance."""


@dataclass
class VerifyReport:
    """The outcome of rerunning a file's golden inputs."""

    path: str
    runtime: str
    max_abs_deviation: float
    deviation: float  # relative to max |golden|
    tolerance: float
    bitwise_equal: Optional[bool]  # whole output hashed the same as at export (None: not comparable)
    values_compared: int

    @property
    def passed(self) -> bool:
        return self.deviation <= self.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.passed else "FAILED: the deviation exceeds the tolerance"
        bitwise = {True: "yes", False: "no", None: "n/a"}[self.bitwise_equal]
        return (f"{self.path} on {self.runtime}: largest deviation {self.deviation:.3g} of max |golden| "
                f"(absolute {self.max_abs_deviation:.3g}; tolerance {self.tolerance:g}; {self.values_compared} values; "
                f"bit-identical to export: {bitwise}) -> {verdict}")


def compare(golden: Golden, output: torch.Tensor, path: str, runtime: str, tolerance: float) -> VerifyReport:
    """Compare a rerun output with the golden one."""
    if tuple(output.shape) != golden.output_shape:
        raise VerificationError(f"{path}: output shape {list(output.shape)} on {runtime}, the golden output has "
                                f"{list(golden.output_shape)}")
    values = output.reshape(-1)[: golden.output.numel()]
    difference = (values - golden.output).abs()
    max_abs = float(difference.max()) if difference.numel() else 0.0
    if not torch.isfinite(values).all():
        max_abs = float("inf")
    scale = float(golden.output.abs().max()) if golden.output.numel() else 1.0
    deviation = max_abs / scale if scale > 0 else max_abs
    return VerifyReport(path, runtime, max_abs, deviation, tolerance,
                        float32_sha256(output) == golden.output_sha256, values.numel())


def verify_checkpoint(path: str, backend: Optional[str] = None, tolerance: Optional[float] = None) -> VerifyReport:
    """Load a qat file (every checksum checked) with `backend` and rerun its golden inputs."""
    golden = read_golden(path)
    if golden is None:
        raise VerificationError(f"{path}: the file holds no golden data ('{KEY_GOLDEN}'); re-export it with "
                                "golden inputs (qat.export_model(..., golden_inputs=...))")
    model = load(path, kernel_backend=backend)
    with torch.no_grad():
        output = output_tensor(model(*golden.inputs))
    kernels = kernels_run(model)
    if tolerance is None:
        tolerance = EXACT_TOLERANCE if set(kernels) <= set(EXACT_BACKENDS) else LOOSE_TOLERANCE
    ran = ", ".join(f"{name} x{count}" for name, count in sorted(kernels.items())) or "none"
    return compare(golden, output, path, f"qat.load, kernels {ran} ({'asked' if backend else 'auto'}), "
                   f"torch {torch.__version__}", tolerance)


def kernels_run(model: torch.nn.Module) -> Counter:
    """How many packed layers ran each kernel (a layer counts once per kernel it ran)."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, _PackedWeight):
            counts.update(module.kernels_run())
    return counts


def verify_onnx(path: str, tolerance: Optional[float] = None) -> VerifyReport:
    """Run an ONNX file written by `qat export --to onnx` on ONNX Runtime (CPU) with its golden inputs."""
    import onnx
    import onnxruntime

    from qat.export.targets.onnx import onnx_session, run_onnx

    model = onnx.load(path, load_external_data=False)
    properties = {p.key: p.value for p in model.metadata_props}
    if KEY_GOLDEN not in properties:
        raise VerificationError(f"{path}: the ONNX model holds no golden data (metadata_props '{KEY_GOLDEN}')")
    golden = decode_golden(properties[KEY_GOLDEN], path)
    levels = [a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"]
    if tolerance is None:
        tolerance = EXACT_TOLERANCE if max(levels, default=0) <= 1 else LOOSE_TOLERANCE
    output = run_onnx(onnx_session(path), golden.inputs).float()
    return compare(golden, output, path, f"onnxruntime {onnxruntime.__version__} (CPU)", tolerance)


def verify(path: str | os.PathLike, backend: Optional[str] = None, tolerance: Optional[float] = None) -> VerifyReport:
    """Rerun the golden inputs of a qat file (.safetensors) or a converted ONNX file; see the module docs."""
    path = os.fspath(int4_path(Path(path)))
    if not Path(path).is_file():
        raise FileNotFoundError(f"no file at {path}")
    if path.endswith(".onnx"):
        return verify_onnx(path, tolerance)
    return verify_checkpoint(path, backend, tolerance)


def run_verify(args: argparse.Namespace) -> int:
    """Handler of `qat verify`: 0 when the outputs match, 1 (with the reason on stderr) otherwise."""
    try:
        report = verify(args.file, args.backend, args.tolerance)
    except (ValueError, FileNotFoundError, ImportError) as err:  # CheckpointError, VerificationError included
        print(f"qat verify: error: {err}", file=sys.stderr)
        return 1
    print(report)
    if not report.passed:
        print(f"qat verify: error: {args.file}: outputs drifted: deviation {report.deviation:.3g} > tolerance "
              f"{report.tolerance:g}", file=sys.stderr)
        return 1
    return 0
