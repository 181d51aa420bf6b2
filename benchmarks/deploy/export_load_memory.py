"""Peak memory of `qat.load` against the file size (and two naive loaders, side by side).

Writes an int4 (group 128, fp16 scales) checkpoint of a wide MLP, then, each in a fresh
process, measures the growth of peak RSS (VmHWM) while loading it:

    qat.load                       skeleton on meta, each tensor read once into its final buffer
    qat.load, warm                 the same after loading a tiny checkpoint (first-call costs paid)
    safetensors.torch.load(bytes)  the whole file in memory plus every tensor (2x file)
    float model                    what the same model costs in float32 (for scale)

Run: .venv/bin/python -m benchmarks.deploy.export_load_memory [--layers 6 --width 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks import record


class WideMLP(nn.Module):
    """`layers` square Linear layers of `width` features with ReLU between them."""

    def __init__(self, layers: int = 6, width: int = 4096) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def peak_rss_bytes() -> int:
    """Peak RSS of this address space (VmHWM). Not ru_maxrss: Linux carries the parent's peak
    into a child's ru_maxrss across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(mode: str, path: str, layers: int, width: int) -> None:
    import safetensors.torch

    import qat

    if mode == "qat.load-warm":
        qat.load(Path(path).with_name("tiny.safetensors"))
    before = peak_rss_bytes()
    if mode.startswith("qat.load"):
        model = qat.load(path)
        assert type(model).__name__ == "WideMLP"  # imported as benchmarks.deploy.export_load_memory, not __main__
    elif mode == "safetensors-bytes":
        tensors = safetensors.torch.load(Path(path).read_bytes())
        assert tensors
    else:
        model = WideMLP(layers, width)
        assert model
    print(json.dumps({"mode": mode, "peak_growth": peak_rss_bytes() - before}))


def export(path: Path, layers: int, width: int) -> int:
    import qat

    torch.manual_seed(0)
    spec = qat.QuantSpec(weight=qat.QuantizerConfig(init="minmax"))
    for target, size in ((path.with_name("tiny.safetensors"), (1, 256)), (path, (layers, width))):
        model, _ = qat.prepare(WideMLP(*size), spec)
        architecture = {"_target_": "benchmarks.deploy.export_load_memory.WideMLP", "layers": size[0], "width": size[1]}
        report = qat.export_model(model, target, architecture=architecture)
        del model
    print(report)
    return report.file_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.layers, args.width)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "wide.safetensors"
        file_bytes = export(path, args.layers, args.width)
        print(record.header())
        print(f"file: {file_bytes / 2**20:.1f} MiB")
        for mode in ("qat.load", "qat.load-warm", "safetensors-bytes", "float-model"):
            command = [sys.executable, "-m", "benchmarks.deploy.export_load_memory", "--layers", str(args.layers),
                       "--width", str(args.width), "--child", mode, str(path)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            growth = result["peak_growth"]
            print(f"{mode:<18} peak RSS growth {growth / 2**20:8.1f} MiB = {growth / file_bytes:.2f}x file size")


if __name__ == "__main__":
    main()
