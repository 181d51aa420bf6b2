"""The CPU anchor: ONNX Runtime's MatMulNBits on the same int4 layer, next to qat's dispatch and dense.

    .venv/bin/python -m benchmarks.kernels.ort_anchor [--rows 1,4,16,64,256,1024] [--threads 2] [--out FILE.md | -]

One 4096 x 4096 layer, int4 g128 asymmetric (fp16 scales in our form; MatMulNBits takes them as fp32,
exactly), timed interleaved call by call in one process with 2 intra-op threads on both sides:
dense F.linear in fp32 and bf16, qat's automatic dispatch with fp32 and bf16 activations, qat's
int8-activation kernel forced on fp32 activations (what QAT_INT8_ACTIVATIONS=all gives), and one
MatMulNBits node with accuracy_level 0 (fp32 compute) and 4 (activations quantized to int8 per block,
integer dot products: the route that reached 6-8x over fp32 in the design card). ORT's threads do not
spin between runs (they would take the cores from the torch calls interleaved with them). Where torchao is installed
(the `peers` extra), torchao's CPU int4 weight-only layer (PrototypeInt4WeightOnlyConfig, g128: its tinygemm
packing for aten._weight_int4pack_mm_for_cpu, bf16 activations, the only dtype it is fast in) is a column too.
Weight copies rotate so that no call finds its weight in cache. The relative error of each output against the
fp64 product with the exact weights is printed too: int8 activations are not free. The table goes to ort_anchor.md
beside this script (`--out -`: print only); the notes below its marker are kept.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from qat.kernels.dispatch import int4_linear_prepared
from qat.kernels.int8_act import int8_act_unsupported
from qat.kernels.reference import dequantize_int4, unpack_int4
from qat.kernels.timing import copies_needed, make_layer

from benchmarks import record
from qat.export.targets.matmul_nbits import choose_layout, nbits_tensors

N = K = 4096
GROUP = 128


def ort_session(weight, accuracy_level: int, threads: int):
    """An ONNX Runtime session of one MatMulNBits node (float32 A (M, K) -> Y (M, N)) for this layer."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    layout = choose_layout(K, GROUP)
    b, scales, zeros = nbits_tensors(unpack_int4(weight.packed), weight.scales, weight.zeros, layout, False)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=layout.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "int4_linear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=[numpy_helper.from_array(t.numpy(), name) for t, name in
                     ((b, "B"), (scales, "scales"), (zeros, "zero_points"))])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)  # 10: what onnxruntime 1.31 reads
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # ORT's pool spins after each run by default: interleaved with torch calls, its spinning threads would take
    # the cores from torch's and inflate every other column (seen: dense fp32 M=1 at 16 ms instead of 4)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def torchao_layers(weights: list[torch.Tensor]) -> list:
    """torchao's CPU int4 weight-only layers (g128, bf16) of the given bf16 weights; [] without torchao."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except ImportError:
        return []
    out = []
    for weight in weights:
        layer = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(weight)
        quantize_(layer, PrototypeInt4WeightOnlyConfig(group_size=GROUP, set_inductor_config=False))
        out.append(layer)
    return out


def timed_methods(x: torch.Tensor, layers: list, dense: dict, sessions: dict, tao: list) -> dict:
    """name -> function(copy index) for every column, on activations x."""
    xb = x.bfloat16()
    fp32, bf16 = dense[torch.float32], dense[torch.bfloat16]
    extra = {"torchao bf16": lambda i: tao[i % len(tao)](xb)} if tao else {}
    if int8_act_unsupported(x, layers[0]) is None:  # its AVX-512 VNNI kernel is compiled in: a column
        extra["qat int8"] = lambda i: int4_linear_prepared(x, layers[i % len(layers)], backend="cpu_int8_act")
    return {**extra,
        "dense fp32": lambda i: F.linear(x, fp32[i % len(fp32)]),
        "dense bf16": lambda i: F.linear(xb, bf16[i % len(bf16)]),
        "qat fp32": lambda i: int4_linear_prepared(x, layers[i % len(layers)]),
        "qat bf16": lambda i: int4_linear_prepared(xb, layers[i % len(layers)]),
        "ort 0": lambda i: sessions[0][i % len(layers)].run(None, {"A": x.numpy()}),
        "ort 4": lambda i: sessions[4][i % len(layers)].run(None, {"A": x.numpy()}),
    }


def relative_error(y, reference: torch.Tensor) -> float:
    y = torch.as_tensor(np.asarray(y)).double()
    return float((y - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,4,16,64,256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved calls per method (fewer at large M)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".md")), help="markdown record, '-' for none")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    layers = [make_layer(N, K, GROUP, "cpu", generator) for _ in range(copies_needed(N * K // 2))]
    dense = {dtype: [dequantize_int4(w.packed, w.scales, w.zeros, GROUP).to(dtype)
                     for w in layers[: copies_needed(N * K * dtype.itemsize)]]
             for dtype in (torch.float32, torch.bfloat16)}
    sessions = {level: [ort_session(w, level, args.threads) for w in layers] for level in (0, 4)}
    tao = torchao_layers([dequantize_int4(w.packed, w.scales, w.zeros, GROUP).bfloat16() for w in layers])
    exact = dequantize_int4(layers[0].packed, layers[0].scales, layers[0].zeros, GROUP).double()
    started = time.perf_counter()
    lines = ["| M | dense fp32 ms | dense bf16 ms | qat auto fp32 x | qat auto bf16 x | qat int8 act, fp32 x | "
             "ORT acc 0 (fp32) | ORT acc 4 (int8 act) | ORT acc 4 vs dense bf16 | "
             + ("torchao int4 bf16 x | " if tao else "")
             + "rel. error qat auto bf16 / qat int8 act / ORT acc 0 / ORT acc 4" + (" / torchao" if tao else "") + " |",
             "| --- " * (11 if tao else 10) + "|"]
    print(lines[0], flush=True)
    for m in [int(value) for value in args.rows.split(",")]:
        x = torch.randn(m, K, generator=generator)
        methods = timed_methods(x, layers, dense, sessions, tao)
        for method in methods.values():  # warm-up: ORT prepacking, qat's autotuning, every copy's forms
            for i in range(len(layers)):
                method(i)
        calls = max(3, min(args.rounds, int(4e10 / (2 * m * N * K))))
        times = {name: [] for name in methods}
        for i in range(calls):
            for j, (name, method) in enumerate(methods.items()):
                start = time.perf_counter()
                method(i * len(methods) + j)  # the next copy each call: none is still in cache from the call before
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        reference = x.double() @ exact.T
        int8 = "qat int8" in methods
        errors = [relative_error(int4_linear_prepared(x.bfloat16(), layers[0]).float(), reference),
                  relative_error(int4_linear_prepared(x, layers[0], backend="cpu_int8_act"), reference) if int8
                  else None]
        errors += [relative_error(sessions[level][0].run(None, {"A": x.numpy()})[0], reference) for level in (0, 4)]
        if tao:
            with torch.no_grad():
                errors.append(relative_error(tao[0](x.bfloat16()).float(), reference))
        fp32, bf16 = ms["dense fp32"], ms["dense bf16"]
        cells = [m, f"{fp32:.3f}", f"{bf16:.3f}", f"{fp32 / ms['qat fp32']:.2f}x", f"{bf16 / ms['qat bf16']:.2f}x",
                 f"{fp32 / ms['qat int8']:.2f}x" if int8 else "n/a", f"{fp32 / ms['ort 0']:.2f}x",
                 f"{fp32 / ms['ort 4']:.2f}x",
                 f"{bf16 / ms['ort 4']:.2f}x", *([f"{bf16 / ms['torchao bf16']:.2f}x"] if tao else []),
                 " / ".join("n/a" if e is None else f"{e:.1e}" for e in errors)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        print(lines[-1], flush=True)
    if args.out != "-":
        import onnxruntime

        header = ["# ONNX Runtime MatMulNBits vs qat's CPU dispatch, 4096x4096 int4 g128", "",
                  f"Machine: {record.machine()}; onnxruntime {onnxruntime.__version__}.",
                  f"Command: `{record.command()}` ({time.perf_counter() - started:.0f} s, {record.now()}).",
                  "Ratios: time(dense of the column's activation dtype) / time(method), medians of interleaved calls "
                  "(qat fp32 x, qat int8 act (`cpu_int8_act` forced, fp32 x) and ORT columns vs dense fp32; qat "
                  "bf16 x and torchao vs dense bf16; ORT acc 4 vs dense bf16: ORT int8 against dense bf16). "
                  "Relative error: "
                  "||y - y_exact|| / ||y_exact||, y_exact the fp64 product with the exact int4 weights.", ""]
        record.write(args.out, "\n".join(header + lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
