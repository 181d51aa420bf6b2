"""Does the decode path change what the int4 file predicts? Held-out perplexity token by token through `qat generate`'s
decoder against the file's exact forward.

The file's held-out blocks (its recipe's validation split, as benchmarks/kernels/int8_activations.py takes them)
run once through `qat.load(kernel_backend="dequant")`, whole blocks at a time (the exact reference), then one token
at a time through `LlamaDecoder.step` (M = 1 per projection: the decode kernels, the compiled operations between
them) with each kernel choice: automatic dispatch (`cpu_gemv_f32` on AVX2 CPUs), torch's int4pack kernel (the float
decode path before it), and int8 activations (`cpu_int8_act`, `qat generate --backend cpu_int8_act`). Prints
perplexity, mean KL to the exact next-token distribution and top-1 agreement with it, per row.

Usage:
    .venv/bin/python -m benchmarks.deploy.decode_path_ppl runs/smollm2_w4_kd/version_0/model.safetensors \
        --val-tokens 2048 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import qat
from benchmarks import record
from benchmarks.kernels.int8_activations import held_out_blocks, logits_for
from qat.hf.llama_decoder import LlamaDecoder

ROWS = (  # (label, kernel backend for every int4 layer, None = automatic dispatch)
    ("decode steps, automatic dispatch", None),
    ("decode steps, torch's int4pack (`cpu_int4pack`)", "cpu_int4pack"),
    ("decode steps, int8 activations (`cpu_int8_act`)", "cpu_int8_act"),
)


def stepped_logits(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """(blocks, T, V) logits, each position after the first computed by one decoder step."""
    decoder = LlamaDecoder(model, max_length=blocks.shape[1])
    rows = []
    for block in blocks:
        logits = [decoder.prefill(block[:1])]
        logits += [decoder.step(int(token)) for token in block[1:]]
        rows.append(torch.stack(logits))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = held_out_blocks(args.file, args.seq_len, args.val_tokens)
    targets = blocks[:, 1:].reshape(-1)
    started = time.perf_counter()
    exact = logits_for(qat.load(args.file, kernel_backend="dequant"), blocks, 4)
    results = [("whole blocks, exact (`dequant`)", exact, time.perf_counter() - started)]
    for label, backend in ROWS:
        started = time.perf_counter()
        logits = stepped_logits(qat.load(args.file, kernel_backend=backend), blocks)
        results.append((label, logits, time.perf_counter() - started))
    reference = torch.log_softmax(exact[:, :-1].reshape(-1, exact.shape[-1]), -1)
    print(record.header())
    print(f"{blocks.shape[0]} held-out blocks of {args.seq_len} tokens, {targets.numel()} predictions each row")
    print("| forward, kernels | perplexity | KL to exact (nats / token) | top-1 agreement with exact | time s |")
    print("| --- | --- | --- | --- | --- |")
    for label, logits, seconds in results:
        log_p = torch.log_softmax(logits[:, :-1].reshape(-1, logits.shape[-1]), -1)
        perplexity = torch.exp(F.nll_loss(log_p, targets)).item()
        kl = max((reference.exp() * (reference - log_p)).sum(-1).mean().item(), 0.0)  # >= 0 but for rounding
        agreement = (log_p.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"| {label} | {perplexity:.4f} | {kl:.6f} | {agreement:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
