"""A real causal LM int4 file through ONNX Runtime.

Exports the file with `qat export --to onnx`'s converter (traced on a (1, 16) batch of ids; batch
and length stay dynamic), runs ONNX Runtime on a held-out-length input and compares its logits
with `qat.load` on the exact reference kernel: largest deviation relative to max |logit|, share
of positions with the same argmax, export time, file size and the time of one forward pass of each.

`--kv-cache` instead exports the graph with past / present key-value tensors (onnx_cache.py) and
decodes greedily with it, feeding each step's presents back: the tokens are compared with
`qat generate`'s decoder on the same prompt, and both decode speeds are printed.

Usage:
    .venv/bin/python -m benchmarks.deploy.onnx_causal_lm /tmp/runs/smollm2_w4_kd/version_0/model.safetensors \\
        [--out /tmp/smollm2.onnx] [--tokens 64] [--threads 2] [--kv-cache --new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import qat
from benchmarks import record
from qat.export.targets.onnx import export_onnx

PROMPT = "The for statement is used to iterate over the elements of a sequence"  # as generate_speed.py


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--out", default="/tmp/qat-causal-lm.onnx")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=0,
                        help="with --kv-cache: MatMulNBits accuracy_level (4: ONNX Runtime's int8 activations)")
    args = parser.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    print(f"{record.header()}\nonnxruntime {onnxruntime.__version__}")
    if args.kv_cache:
        decode_with_cache(args)
        return
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


def decode_with_cache(args: argparse.Namespace) -> None:
    """Greedy decoding through the KV-cache graph against qat's own decoder, tokens and speed."""
    from qat.export.targets.onnx import onnx_session
    from qat.export.targets.onnx_cache import empty_cache, export_onnx_with_cache
    from qat.hf.generate import decoder_for, tokenizer_for

    start = time.perf_counter()
    report = export_onnx_with_cache(args.file, args.out, accuracy_level=args.accuracy_level)
    exported = time.perf_counter() - start
    session = onnx_session(args.out, threads=args.threads)
    model = qat.load(args.file)
    prompt = torch.tensor([tokenizer_for(args.file)(PROMPT)["input_ids"]])  # real text: random ids give near-ties
    keys, values = (t.numpy() for t in empty_cache(model.config))
    logits, keys, values = session.run(None, {"input_ids": prompt.numpy(), "past_keys": keys, "past_values": values})
    theirs = [int(logits[0, -1].argmax())]
    start = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        logits, keys, values = session.run(None, {"input_ids": torch.tensor([[theirs[-1]]]).numpy(),
                                                  "past_keys": keys, "past_values": values})
        theirs.append(int(logits[0, -1].argmax()))
    onnx_rate = (args.new_tokens - 1) / (time.perf_counter() - start)
    decoder = decoder_for(model, prompt.shape[1] + args.new_tokens)
    decoder.prepare()
    ours = [int(decoder.prefill(prompt[0]).argmax())]
    start = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        ours.append(int(decoder.step(ours[-1]).argmax()))
    qat_rate = (args.new_tokens - 1) / (time.perf_counter() - start)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    print(f"{len(report.matmul_nbits)} MatMulNBits; export {exported:.0f} s; "
          f"file {os.path.getsize(args.out) / 1e6:.1f} MB")
    print(f"greedy from a {prompt.shape[1]}-token prompt: the first {same} of {args.new_tokens} tokens equal "
          "to qat's decoder")
    print(f"decode: ONNX Runtime with the KV cache {onnx_rate:.1f} tokens/s, qat decoder {qat_rate:.1f} tokens/s")


if __name__ == "__main__":
    main()
