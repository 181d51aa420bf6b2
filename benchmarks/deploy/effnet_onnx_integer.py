"""ONNX Runtime latency of EfficientNet-Lite0: the integer QDQ graph (`qat export --to onnx --integer`) against fp32.

One process builds EfficientNetLite(num_classes=10) with the ImageNet lite0 weights (all but the classifier;
random ones if the weights package is missing), prepares it for W4 per-channel / A8 QAT with BatchNorm folded
(the spec of tests/qat/export/targets/test_onnx_integer.py), calibrates it on random images (no training:
speed does not depend on the values, but an untrained network's pooled features are all 0, a degenerate
scale) and writes three ONNX models of it:

    int8 QDQ     export_onnx_integer: ORT runs QLinearConv / QLinearAdd / QGemm (the counts are printed)
    fp32         torch.onnx.export of the float model before prepare (ORT folds BatchNorm, fuses Conv + Clip)
    fp32 + fq    export_onnx(weights="float"): qat's float graph, dequantized weights and the activation
                 points as float fake-quant ops (what --to onnx writes for a CNN without --integer)

Each is timed with `intra_op_num_threads` threads (default 2), ORT_ENABLE_ALL, at batch 1 and batch 32, the
sessions interleaved round-robin (the machine is shared: read the ratios, not the absolute times); the
median of `--repeats` runs is reported with its ratio to fp32.

    .venv/bin/python -m benchmarks.deploy.effnet_onnx_integer [--threads 2] [--size 64] [--repeats 50]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qat
from benchmarks import record
from qat import QuantizerConfig, QuantRule, QuantSpec, default_activation_config
from qat.export.targets.onnx import export_onnx, onnx_session, run_onnx
from qat.export.targets.onnx_integer import export_onnx_integer
from qat.models import EfficientNetLite

SPEC = QuantSpec(weight=QuantizerConfig(bits=4, granularity="channel", init="minmax", scale_dtype="float32"),
                 activation=default_activation_config(8), fold_batchnorm=True,
                 rules=[QuantRule(type="Conv2d", quantize_activations=False),
                        QuantRule(type="Linear", quantize_activations=False)])


def time_interleaved(sessions: dict, inputs: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per run of each session, runs interleaved round-robin after 3 warm-up runs each."""
    for s in sessions.values():
        for _ in range(3):
            run_onnx(s, inputs)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            run_onnx(s, inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def build(folder: Path, size: int) -> tuple[dict[str, Path], str]:
    """The three ONNX files, and the integer report."""
    torch.manual_seed(0)
    try:
        float_model = EfficientNetLite(num_classes=10, pretrained=True).eval()
    except ImportError:
        float_model = EfficientNetLite(num_classes=10).eval()
    model, _ = qat.prepare(copy.deepcopy(float_model), SPEC)
    x = torch.randn(8, 3, size, size)
    qat.calibrate(model, [x])
    qat_file = folder / "lite0.safetensors"
    qat.export_model(model.eval(), qat_file, architecture={"_target_": "qat.models.EfficientNetLite",
                                                           "num_classes": 10}, golden_inputs=(x[:2],))
    files = {"int8 QDQ": folder / "int8.onnx", "fp32": folder / "fp32.onnx", "fp32 + fq": folder / "fq.onnx"}
    report = export_onnx_integer(qat_file, files["int8 QDQ"], (x[:2],))
    torch.onnx.export(float_model, (x[:2],), files["fp32"], dynamo=True, input_names=["input_0"],
                      output_names=["output"], dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False)
    export_onnx(qat_file, files["fp32 + fq"], weights="float")
    return files, str(report)


def main() -> None:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model and batch size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        files, report = build(Path(folder), args.size)
        sessions = {name: onnx_session(path, args.threads) for name, path in files.items()}
        rows = []
        for batch in (1, 32):
            inputs = (torch.randn(batch, 3, args.size, args.size),)
            medians = time_interleaved(sessions, inputs, args.repeats)
            rows += [f"| {batch} | {name} | {seconds * 1e3:.2f} | {medians['fp32'] / seconds:.2f}x |"
                     for name, seconds in medians.items()]
    print(f"CPU: {record.cpu_line()}")
    print(f"onnxruntime {onnxruntime.__version__} (CPU, ORT_ENABLE_ALL), intra_op_num_threads={args.threads}, "
          f"torch {torch.__version__}; EfficientNet-Lite0, 10 classes, {args.size}x{args.size}, "
          f"median of {args.repeats} runs, sessions interleaved")
    print(f"Command: {record.command()}")
    print(f"Integer graph: {report}\n")
    print("| batch | model | median ms | speed vs fp32 |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
