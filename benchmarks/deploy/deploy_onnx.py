"""ONNX Runtime latency: the int4 graph (MatMulNBits) against the float graph of the same exact weights.

Both graphs come from the same qat file with `export_onnx(weights="int4" | "float")`; each
model is timed at M=1 with both sessions interleaved (the machine is shared and noisy:
ratios from one run are what to read, not absolute times).

    python -m benchmarks.deploy.deploy_onnx [--threads 2] [--repeats 200] [--out deploy_onnx.json]

The figures go to deploy_onnx.json beside this script, with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import qat
from benchmarks import record
from qat import QuantizerConfig, QuantSpec
from qat.export.targets.onnx import export_onnx, onnx_session, run_onnx
from qat.models import DigitsCNN, TinyLM


def _prepared(model: nn.Module, group_size: int, calibrate_with: torch.Tensor) -> nn.Module:
    spec = QuantSpec(weight=QuantizerConfig(bits=4, granularity="group", group_size=group_size, init="minmax"))
    model, _ = qat.prepare(model, spec)
    qat.calibrate(model, [calibrate_with])
    return model.eval()


def cases() -> dict[str, tuple[nn.Module, dict, tuple]]:
    """name -> (prepared model, architecture, M=1 inputs)."""
    torch.manual_seed(0)
    x_big = torch.randn(1, 4096)
    digits = torch.rand(1, 1, 8, 8)
    tokens = torch.randint(0, 64, (1, 32))
    return {
        "linear 4096x4096 g128": (_prepared(Linear4096(), 128, x_big),
                                  {"_target_": "benchmarks.deploy.deploy_onnx.Linear4096"}, (x_big,)),
        "digits CNN (batch 1)": (_prepared(DigitsCNN(), 128, digits), {"_target_": "qat.models.DigitsCNN"}, (digits,)),
        "TinyLM (1 x 32 tokens)": (_prepared(TinyLM(), 32, tokens), {"_target_": "qat.models.TinyLM"}, (tokens,)),
    }


def time_interleaved(sessions: dict, inputs: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per run of each session, runs interleaved round-robin."""
    for session in sessions.values():
        for _ in range(10):
            run_onnx(session, inputs)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            run_onnx(session, inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, architecture, inputs) in cases().items():
            path = Path(folder) / "model.safetensors"
            qat.export_model(model, path, architecture=architecture, golden_inputs=inputs)
            files = {"float": Path(folder) / "float.onnx", "int4": Path(folder) / "int4.onnx",
                     "int4 acc4": Path(folder) / "int4_acc4.onnx"}
            export_onnx(path, files["float"], weights="float")
            export_onnx(path, files["int4"])
            export_onnx(path, files["int4 acc4"], accuracy_level=4)
            sessions = {kind: onnx_session(file, threads=args.threads) for kind, file in files.items()}
            medians = time_interleaved(sessions, inputs, args.repeats)
            results[name] = {"median_ms": {k: v * 1e3 for k, v in medians.items()},
                             "speedup_vs_float": {k: medians["float"] / v for k, v in medians.items()},
                             "bytes": {k: file.stat().st_size for k, file in files.items()}}
            print(name, json.dumps(results[name], indent=None))
    Path(args.out).write_text(json.dumps({"machine": record.machine(), "command": record.command(),
                                          "date": record.now(), "threads": args.threads, "repeats": args.repeats,
                                          "torch": torch.__version__, "results": results}, indent=2))


class Linear4096(nn.Sequential):
    """One bias-free 4096x4096 Linear (the benchmark's anchor layer), rebuildable by qat.load."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4096, 4096, bias=False))


if __name__ == "__main__":
    main()
