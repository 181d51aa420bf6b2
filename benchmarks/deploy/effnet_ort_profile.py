"""Where ONNX Runtime spends an EfficientNet-Lite0 image: its profiler, per kind of layer, fp32 vs integer graph.

Given a run directory of `recipes/effnet_lite0_fmnist_w4a8.yaml`, writes the integer QDQ graph of its int4 file
(`export_onnx_integer`) and the fp32 graph of its fine-tuned float model (as benchmarks.models.effnet_fmnist
does), runs each `--runs` times at batch 1 with ORT's profiler on, and sums the kernel time of each node
by kind: the stem (3x3 conv on 3 channels), depthwise convs, 1x1 convs, and everything else by op type. A
node is classified by the conv it came from in the ONNX model (its `group` and kernel shape): ORT's fused
nodes are named after that conv ('node_conv_1_token_4', QDQ -> QLinearConv) or after the output of the last
op fused into it ('/stem/stem.2/Clip_output_0_nchwc', Conv + Clip in NCHWc layout).

    .venv/bin/python -m benchmarks.deploy.effnet_ort_profile RUN_DIR [--threads 1] [--runs 300]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from benchmarks import record
from benchmarks.models.effnet_fmnist import float_model
from qat.export.targets.onnx_integer import export_onnx_integer

FUSED_AFTER_CONV = ("Clip", "Relu", "Add")  # ORT's NCHWc conv names itself after the last op it fused


def conv_kinds(path: Path) -> dict[str, str]:
    """'stem' / 'depthwise' / '1x1' / 'kxk' for every Conv of the ONNX model at `path`, by node name and by the
    output tensor of the conv and of the activation / residual add fused after it."""
    model = onnx.load(str(path))
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    kinds = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight = node.input[1]
        while weight not in shapes and weight in producers:  # through DequantizeLinear to the int8 initializer
            weight = producers[weight].input[0]
        out_ch, in_per_group, kh, _ = shapes[weight]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        kind = ("stem" if in_per_group == 3 and group == 1 else "depthwise" if group == out_ch > 1
                else "1x1" if kh == 1 else "kxk")
        kinds[node.name] = kinds[node.output[0]] = kind
        tensor = node.output[0]
        while len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type in FUSED_AFTER_CONV:
            tensor = consumers[tensor][0].output[0]
            kinds[tensor] = kind
    return kinds


def kind_of(node: str, kinds: dict[str, str]) -> str | None:
    """The kind of the conv whose name is the longest prefix of the profiled node's name (then '_' or end)."""
    matches = [name for name in kinds if node == name or node.startswith(name + "_")]
    return kinds[max(matches, key=len)] if matches else None


def profile(path: Path, threads: int, runs: int, prefix: Path) -> tuple[float, dict[str, float]]:
    """(mean model_run microseconds, microseconds per run by kind) from ORT's profiler at batch 1."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 64, 64), np.float32)}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    kinds = conv_kinds(path)
    count = sum(1 for e in events if e.get("name") == "model_run")
    total = sum(e["dur"] for e in events if e.get("name") == "model_run") / count
    by_kind: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_kind[kind_of(event["name"][: -len("_kernel_time")], kinds) or event["args"]["op_name"]] += \
                event["dur"] / count
    return total, dict(by_kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        integer_path, fp32_path = Path(tmp) / "int8.onnx", Path(tmp) / "fp32.onnx"
        export_onnx_integer(args.run_dir / "model.safetensors", integer_path)
        torch.onnx.export(float_model(args.run_dir), (torch.zeros(1, 3, 64, 64),), fp32_path, dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        fp32_total, fp32 = profile(fp32_path, args.threads, args.runs, Path(tmp) / "fp32")
        int_total, integer = profile(integer_path, args.threads, args.runs, Path(tmp) / "int8")
    rows = [f"{record.cpu_line()}; {args.threads} thread(s); batch 1; mean of {args.runs} runs (ORT profiler)", "",
            "| kind | fp32 us | integer us | fp32 / integer |", "| --- | --- | --- | --- |"]
    for kind in sorted(set(fp32) | set(integer), key=lambda k: -max(fp32.get(k, 0), integer.get(k, 0))):
        a, b = fp32.get(kind, 0.0), integer.get(kind, 0.0)
        rows.append(f"| {kind} | {a:.1f} | {b:.1f} | {f'{a / b:.2f}x' if a and b else '-'} |")
    rows.append(f"| whole run | {fp32_total:.1f} | {int_total:.1f} | {fp32_total / int_total:.2f}x |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
