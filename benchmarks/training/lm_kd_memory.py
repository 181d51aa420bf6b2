"""Peak memory of language-model distillation losses: chunked vs naive, forward + backward.

Each variant runs in a fresh process; the figure is the growth of peak RSS (VmHWM) from just
before the loss call to just after its backward (inputs, heads and imports excluded):

    naive logits         kd_logit_loss on full (B, T, V) float32 logits (the pre-existing loss)
    token_kd_loss        the chunked loss on the same logits (custom autograd, recomputed backward)
    naive heads          logits = head(hidden) for student and teacher, then kd_logit_loss
    head_kd_loss         hidden states + heads, chunk by chunk, gradients made with the value
    ..., int4 student head   the same with the student head a QuantLinear (4-bit weight, group 64)

The logits variants start from logits that already exist (2 x B*T*V float32) and must return
their (B, T, V) gradient; the head variants start from (B, T, H) hidden states.

Run: .venv/bin/python -m benchmarks.training.lm_kd_memory [--batch 4 --seq 256 --vocab 49152 --hidden 576 --only head]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from benchmarks import record
from qat.config import LayerConfig, QuantizerConfig
from qat.distill import head_kd_loss, kd_logit_loss, token_kd_loss
from qat.modules import QuantLinear

MiB = 2**20


def peak_rss_bytes() -> int:
    """Peak RSS of this process (VmHWM; not ru_maxrss, which inherits the parent's peak across fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_loss(variant: str, chunk_size: int, batch: int, seq: int, vocab: int, hidden: int) -> Callable[[], Tensor]:
    """The variant's inputs (and heads) and a closure computing its loss."""
    if variant.startswith(("naive logits", "token_kd")):
        student = torch.randn(batch, seq, vocab, requires_grad=True)
        teacher = torch.randn(batch, seq, vocab)
        if variant.startswith("naive"):
            return lambda: kd_logit_loss(student, teacher, 2.0)
        return lambda: token_kd_loss(student, teacher, None, 2.0, chunk_size)
    student_head, teacher_head = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    if "int4" in variant:  # the student head as QAT trains it: 4-bit weight, group 64, asymmetric, LSQ
        config = LayerConfig(QuantizerConfig(bits=4, group_size=64, symmetric=False), None)
        student_head = QuantLinear.from_float(student_head, config)
    teacher_head.requires_grad_(False)
    student_head.weight.grad = torch.zeros_like(student_head.weight)  # allocated up front in both variants
    student, teacher = torch.randn(batch, seq, hidden, requires_grad=True), torch.randn(batch, seq, hidden)
    if variant.startswith("naive"):
        return lambda: kd_logit_loss(student_head(student), teacher_head(teacher), 2.0)
    return lambda: head_kd_loss(student, teacher, student_head, teacher_head, None, 2.0, chunk_size)


def child(variant: str, chunk_size: int, batch: int, seq: int, vocab: int, hidden: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    make_loss(variant, chunk_size, 2, 3, 5, 64)().backward()  # warm-up: first-call costs (checkpoint's ~4 s) paid
    loss_fn = make_loss(variant, chunk_size, batch, seq, vocab, hidden)
    before = peak_rss_bytes()
    start = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "peak_growth_mib": (peak_rss_bytes() - before) / MiB, "seconds": seconds,
            "loss": loss.item()}


VARIANTS = [("naive logits", 0), ("token_kd_loss, chunk 1024", 1024), ("token_kd_loss, chunk 256", 256),
            ("naive heads", 0), ("head_kd_loss, chunk 1024", 1024), ("head_kd_loss, chunk 256", 256),
            ("naive heads, int4 student head", 0), ("head_kd_loss, int4 student head, chunk 256", 256)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--only", default="", help="run only the variants whose name contains this text")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "CHUNK"))
    args = parser.parse_args()
    shape = (args.batch, args.seq, args.vocab, args.hidden)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), *shape)))
        return
    rows = []
    for variant, chunk in (v for v in VARIANTS if args.only in v[0]):
        command = [sys.executable, "-m", "benchmarks.training.lm_kd_memory", "--child", variant, str(chunk),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    full_logits_mib = args.batch * args.seq * args.vocab * 4 / MiB
    print(record.header())
    print(f"B={args.batch} T={args.seq} V={args.vocab} H={args.hidden}; one fp32 (B, T, V) tensor = "
          f"{full_logits_mib:.0f} MiB; each variant in a fresh process with 1 intra-op thread")
    print("| variant | peak RSS growth (MiB) | / one (B,T,V) fp32 | fwd+bwd (s) | loss |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_growth_mib']:.0f} | {row['peak_growth_mib'] / full_logits_mib:.2f}x "
              f"| {row['seconds']:.2f} | {row['loss']:.6f} |")


if __name__ == "__main__":
    main()
