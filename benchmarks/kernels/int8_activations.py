"""What int8 activations cost in accuracy: an int4 causal-LM file's held-out perplexity per activation precision.

The int4 file (e.g. the SmolLM2 recipe's export) runs on its recipe's validation split (the same
TextDataModule settings, so the same held-out blocks) through `qat.load` with

* fp32 activations and the exact `dequant` kernel (the reference everything is compared with),
* each QAT_INT8_ACTIVATIONS policy (`off`, `bf16` = the default, `all`) for bf16 and fp32 activations,
  with automatic dispatch choosing kernels as it would for a user,

and prints perplexity, the mean KL divergence of each row's next-token distribution from the exact
one, and top-1 agreement with it. Weights are the same int4 codes in every row: only the activation
and compute precision differ.

Usage:
    .venv/bin/python -m benchmarks.kernels.int8_activations runs/smollm2_w4_kd/version_0/model.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from qat.kernels import dispatch, int8_act

import qat
from benchmarks import record
from qat.data import TextDataModule
from qat.hf.generate import tokenizer_for

ROWS = (  # (label, activation dtype, int8 policy, forced backend or None for automatic dispatch)
    ("fp32 x, exact (`dequant`)", torch.float32, "off", "dequant"),
    ("fp32 x, automatic, policy off / bf16 (float kernels, bf16 compute)", torch.float32, "bf16", None),
    ("fp32 x, automatic, policy all (int8 x)", torch.float32, "all", None),
    ("bf16 x, automatic, policy off (float kernels)", torch.bfloat16, "off", None),
    ("bf16 x, automatic, policy bf16 = default (int8 x)", torch.bfloat16, "bf16", None),
)


def held_out_blocks(path: str, seq_len: int, val_tokens: int) -> torch.Tensor:
    data = TextDataModule(tokenizer_for(path), seq_len=seq_len, batch_size=4, val_tokens=val_tokens)
    data.setup()
    return torch.stack([data.val_set[i]["input_ids"] for i in range(len(data.val_set))])


def logits_for(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=blocks[i:i + batch]).logits.float() for i in range(0, len(blocks), batch)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = held_out_blocks(args.file, args.seq_len, args.val_tokens)
    targets = blocks[:, 1:].reshape(-1)
    models = {dtype: qat.load(args.file, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    results = []
    for label, dtype, policy, backend in ROWS:
        os.environ[int8_act.ENV_VAR] = policy
        if backend is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = backend
        started = time.perf_counter()
        logits = logits_for(models[dtype], blocks, args.batch)
        results.append((label, logits[:, :-1].reshape(-1, logits.shape[-1]), time.perf_counter() - started))
    os.environ.pop(dispatch.ENV_VAR, None)
    os.environ.pop(int8_act.ENV_VAR, None)
    reference = torch.log_softmax(results[0][1], -1)
    print(record.header())
    print(f"{blocks.shape[0]} held-out blocks of {args.seq_len} tokens")
    print("| activations, kernels | perplexity | KL to exact (nats / token) | top-1 agreement with exact | time s |")
    print("| --- | --- | --- | --- | --- |")
    for label, logits, seconds in results:
        log_p = torch.log_softmax(logits, -1)
        perplexity = torch.exp(F.nll_loss(log_p, targets)).item()
        kl = (reference.exp() * (reference - log_p)).sum(-1).mean().item()
        agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"| {label} | {perplexity:.3f} | {kl:.5f} | {agreement:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
