"""A real causal LM int4 file through ONNX Runtime (issue 11: "SmolLM2 if the graph export fits").

Exports the file with `qat export --to onnx`'s converter (traced on a (1, 16) batch of ids; batch
and length stay dynamic), runs ONNX Runtime on a held-out-length input and compares its logits
with `qat.load` on the exact reference kernel: largest deviation relative to max |logit|, share
of positions with the same argmax, export time, file size and the time of one forward pass of each.

Usage:
    .venv/bin/python -m benchmarks.onnx_causal_lm /tmp/runs/smollm2_w4_kd/version_0/model.safetensors \\
        [--out /tmp/smollm2.onnx] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import qat
from qat.export.targets.onnx import export_onnx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--out", default="/tmp/qat-causal-lm.onnx")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    report = export_onnx(args.file, args.out, example_inputs=(torch.arange(1, 17)[None],))
    exported = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(args.out, options, providers=["CPUExecutionProvider"])
    loaded = qat.load(args.file, kernel_backend="reference")
    fast = qat.load(args.file)
    ids = torch.randint(0, loaded.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    feeds = {session.get_inputs()[0].name: ids.numpy()}
    start = time.perf_counter()
    got = torch.from_numpy(session.run(None, feeds)[0])
    onnx_s = time.perf_counter() - start
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
        fast(input_ids=ids)  # warm-up: kernel forms and dispatch choices
        start = time.perf_counter()
        fast(input_ids=ids)
        qat_s = time.perf_counter() - start
    deviation = float((got - expected).abs().max() / expected.abs().max())
    same = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    size = os.path.getsize(args.out) / 1e6
    print(f"{len(report.matmul_nbits)} MatMulNBits; export {exported:.0f} s; file {size:.1f} MB")
    print(f"1 x {args.tokens} random ids: deviation {deviation:.2e} of max |logit|, "
          f"same argmax at {same:.3f} of positions")
    print(f"one forward: ONNX Runtime {onnx_s * 1e3:.0f} ms (first run), qat.load (auto kernels) {qat_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
