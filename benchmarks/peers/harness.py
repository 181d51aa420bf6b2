"""What every causal-LM peer comparison shares: the held-out text, the float reference, and the scoring.

A peer tool is anything that maps one block of token ids to next-token logits: a torch module (qat,
torchao), a llama.cpp context, an ONNX Runtime session. Each is wrapped as a `Candidate` and scored
on the same blocks as every other one:

- perplexity on each text domain (the recipe's held-out training text, then each evaluation domain);
- mean KL(float || candidate) per next-token position, over all domains;
- top-1 agreement: the share of positions whose argmax equals the float model's;
- bits per weight: every stored tensor counted (8 * bytes / float parameter count), so that a tool which
  keeps the embedding or norms in float pays for it;
- the wall time the tool took to quantize.

The float model's log-probabilities are computed once (`Reference`) and kept in memory (float32: about
0.2 MB per token for a 49k vocabulary), so each candidate costs one pass over the text.

    reference = Reference.build("recipes/smollm2_w4_kd.yaml", tokens=8192)
    row = reference.score(torch_candidate("float", model, quantize_s=0.0))
    print(markdown_table(reference, [row]))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import record
from qat.tasks.classification import IGNORE

Logits = Callable[[Sequence[int]], Tensor]  # token ids of one block -> (T, vocab) float32 logits


@dataclass
class Candidate:
    """One quantized (or float) model as a peer tool leaves it, ready to score."""

    label: str
    logits: Logits
    weight_bytes: int  # every stored tensor, tied ones once
    quantize_s: float | None  # wall time of the quantization (None: not measured here; the note says where)
    settings: str = ""  # the tool's exact configuration and version


@dataclass
class Row:
    """A candidate's figures on the reference text."""

    candidate: Candidate
    perplexity: dict[str, float]
    kl: float
    top1: float
    bits_per_weight: float
    eval_s: float


@dataclass
class Failed:
    """A peer that could not be installed, built or run here: the table says so instead of leaving it out."""

    label: str
    error: str


@dataclass
class Reference:
    """The held-out blocks of each domain and the float model's log-probabilities on them."""

    blocks: dict[str, list[list[int]]]  # domain -> blocks of token ids (each scored on positions 0..T-2)
    float_logprobs: dict[str, list[Tensor]] = field(default_factory=dict)  # domain -> (T-1, V) per block
    parameters: int = 0  # the float model's parameter count, tied tensors once

    @staticmethod
    def from_blocks(blocks: dict[str, list[list[int]]], float_model: nn.Module) -> Reference:
        """Runs the float model once over every block and keeps its log-probabilities."""
        ref = Reference(blocks=blocks, parameters=parameter_count(float_model))
        logits = module_logits(float_model)
        ref.float_logprobs = {domain: [F.log_softmax(logits(ids)[:-1], -1) for ids in domain_blocks]
                              for domain, domain_blocks in blocks.items()}
        return ref

    def score(self, candidate: Candidate) -> Row:
        """The candidate's perplexity per domain, KL and top-1 agreement to float, bits per weight."""
        start = time.perf_counter()
        perplexity, kl_sum, agree, positions = {}, 0.0, 0, 0
        for domain, domain_blocks in self.blocks.items():
            nll, count = 0.0, 0
            for ids, reference in zip(domain_blocks, self.float_logprobs[domain], strict=True):
                logprobs = F.log_softmax(candidate.logits(ids)[:-1].float(), -1)
                targets = torch.tensor(ids[1:])
                nll += float(F.nll_loss(logprobs, targets, reduction="sum", ignore_index=IGNORE))
                count += len(targets)
                kl_sum += float((reference.exp() * (reference - logprobs)).sum())
                agree += int((logprobs.argmax(-1) == reference.argmax(-1)).sum())
                positions += len(targets)
            perplexity[domain] = math.exp(nll / count)
        return Row(candidate, perplexity, kl_sum / positions, agree / positions,
                   8 * candidate.weight_bytes / self.parameters, time.perf_counter() - start)


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, each tensor once (a tied embedding and head count once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of a state dict's tensors, each storage once (tied weights share one)."""
    seen: dict[int, int] = {}
    for t in tensors.values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def module_logits(model: nn.Module) -> Logits:
    """Logits of a Hugging Face causal LM (or anything returning `.logits`) for one block, no grad."""
    def logits(ids: Sequence[int]) -> Tensor:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids)]))
        return (out.logits if hasattr(out, "logits") else out)[0].float()
    return logits


def torch_candidate(label: str, model: nn.Module, quantize_s: float | None, settings: str = "",
                    weight_bytes: int | None = None) -> Candidate:
    """A torch module as a candidate; its weight bytes are its state dict's unless given."""
    model.eval()
    size = tensor_bytes(model.state_dict()) if weight_bytes is None else weight_bytes
    return Candidate(label, module_logits(model), size, quantize_s, settings)


def markdown_table(reference: Reference, rows: Sequence[Row | Failed]) -> str:
    """One row per candidate: perplexity per domain, KL, top-1, bits per weight, quantize time."""
    domains = list(reference.blocks)
    tokens = {d: sum(len(b) - 1 for b in blocks) for d, blocks in reference.blocks.items()}
    head = " | ".join(f"ppl {d} ({tokens[d]} tok)" for d in domains)
    lines = [f"| tool, setting | {head} | KL to float | top-1 = float | bits/weight | quantize |",
             "| --- |" + " ---: |" * (len(domains) + 4)]
    for row in rows:
        if isinstance(row, Failed):
            lines.append(f"| {row.label} | failed: {row.error} |" + " |" * (len(domains) + 3))
            continue
        ppl = " | ".join(f"{row.perplexity[d]:.2f}" for d in domains)
        took = "" if row.candidate.quantize_s is None else duration(row.candidate.quantize_s)
        lines.append(f"| {row.candidate.label} | {ppl} | {row.kl:.4f} | {row.top1:.1%} | "
                     f"{row.bits_per_weight:.2f} | {took} |")
    return "\n".join(lines)


def settings_list(rows: Sequence) -> str:
    """The exact configuration of every candidate, one bullet each (any scored row with a `.candidate`
    that has `.label` and `.settings`; failed rows are left out: the table carries their error)."""
    return "\n".join(f"- **{row.candidate.label}**: {row.candidate.settings}" for row in rows
                     if not isinstance(row, Failed) and row.candidate.settings)


def write_record(title: str, seconds: float, table: str, rows: Sequence, output: Optional[str]) -> None:
    """Print a peers record (title, machine and command, the table, every candidate's settings) and write it to
    `output` when given."""
    text = "\n".join([f"# {title}", "", record.header(seconds), "", table, "", "Settings:", "", settings_list(rows),
                      ""])
    print(text)
    if output:
        print(f"wrote {record.write(output, text)}")


def qat_file_bytes(path) -> int:
    """Bytes of every tensor a qat int4 file stores (codes, scales, zero points, float tensors)."""
    from qat.export.reader import read_header

    return sum(entry.nbytes for entry in read_header(path).tensors.values())


def duration(seconds: float) -> str:
    """A wall time for a table cell: seconds under two minutes, else minutes."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
