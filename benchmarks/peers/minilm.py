"""all-MiniLM-L6-v2 through qat and through the tools a user would pick instead, scored on the same sentences.

Rows (each peer run by its own code at the settings a careful user would choose; a peer that is not installed
or fails gets a row with its error):

- float (float32, and bfloat16: the activation dtype of torchao's CPU int4 path); qat round-to-nearest
  (min-max group ranges); qat GPTQ (the recipe's spec and calibration: its start); qat GPTQ with the
  embedding tables left float (what the peers below do); qat's recipe file (GPTQ start, QAT + KD) in
  `qat.load`, and the same file exported to ONNX and run by ONNX Runtime;
- torchao: int4 weight-only PTQ (its CPU config, bf16) at each `--groups` size, min-max and HQQ parameters;
- ONNX Runtime's MatMulNBits quantizer on the float ONNX export of the encoder: RTN and HQQ at each group,
  RTN with the embedding tables quantized too (GatherBlockQuantized), and its Intel Neural Compressor RTN.

Text: the recipe's held-out sentences and those of each evaluation domain (`data.args.eval_corpora`), in the
recipe's validation batches, the same for every row. Figures, per domain, against the float32 model: mean
cosine of the sentence embeddings (mean pooling, L2-normalized, as the recipe trains and validates) and top-1
nearest-neighbour agreement within the domain's sentences (`qat.eval.metrics`, as `qat eval` reports them);
bits per weight with every stored tensor counted (8 * bytes / the float model's parameter count); the wall time
the tool took to quantize.

Usage (a quarter of an hour on one core; the sections can run apart, e.g. the peers while the recipe trains,
`--skip qat-file`, and its file's rows after, `--skip qat torchao onnxruntime`):
    .venv/bin/python -m benchmarks.peers.minilm --file runs/minilm_w4_kd/version_0/model.safetensors \\
        [--recipe recipes/minilm_w4_kd.yaml] [--groups 128 64] [--skip NAME ...] \\
        [--output benchmarks/peers/minilm.md] [recipe overrides, e.g. 'data.args.eval_corpora=[debian:licenses]']
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.peers.harness import Failed, duration, parameter_count, qat_file_bytes, tensor_bytes, write_record
from benchmarks.peers.smollm2 import QAT_PTQ, qat_ptq_files, run_seconds
from qat.data.loading import calibration_loader, validation_loaders
from qat.distill.embedding import mean_pool
from qat.eval.metrics import mean_cosine, neighbour_agreement
from qat.export import load
from qat.recipe import load_recipe
from qat.run.eval_sources import EvalSources
from qat.run.models import load_float_model
from qat.tasks.embedding import EmbeddingTask

Embed = Callable[[dict], Tensor]  # one validation batch -> (B, H) sentence embeddings, float32
HELD_OUT = "held-out"  # the name of the recipe's own validation sentences (loader '')
FLOAT_EMBEDDINGS = "quant.rules=[{name: 'embeddings[.].*', skip: true}]"  # word, position, token-type tables


@dataclass
class Encoder:
    """One quantized (or float) encoder as a tool leaves it, ready to score."""

    label: str
    embed: Embed
    weight_bytes: int  # every stored tensor, shared ones once
    quantize_s: float | None  # wall time of the quantization (None: not measured here)
    settings: str = ""  # the tool's exact configuration and version


@dataclass
class EmbeddingRow:
    """An encoder's figures on the reference sentences, per domain."""

    candidate: Encoder
    cosine: dict[str, float]
    nn_agreement: dict[str, float]
    bits_per_weight: float
    eval_s: float


@dataclass
class EmbeddingReference:
    """The validation batches of each domain and the float model's sentence embeddings of them."""

    batches: dict[str, list[dict]]  # domain -> batches
    float_embeddings: dict[str, Tensor] = field(default_factory=dict)  # domain -> (sentences, H)
    parameters: int = 0  # the float model's parameter count, shared tensors once

    @staticmethod
    def from_batches(batches: dict[str, list[dict]], float_model: nn.Module) -> EmbeddingReference:
        """Embeds every domain's sentences once with the float model."""
        embed = module_embed(float_model)
        return EmbeddingReference(batches, {domain: embed_all(embed, domain_batches)
                                            for domain, domain_batches in batches.items()},
                                  parameter_count(float_model))

    def sentences(self, domain: str) -> int:
        return int(self.float_embeddings[domain].shape[0])

    def score(self, candidate: Encoder) -> EmbeddingRow:
        """The candidate's mean cosine to float and nearest-neighbour agreement per domain, bits per weight."""
        start = time.perf_counter()
        embeddings = {domain: embed_all(candidate.embed, batches) for domain, batches in self.batches.items()}
        cosine = {d: mean_cosine(e, self.float_embeddings[d]) for d, e in embeddings.items()}
        agreement = {d: neighbour_agreement(e, self.float_embeddings[d]) for d, e in embeddings.items()}
        return EmbeddingRow(candidate, cosine, agreement, 8 * candidate.weight_bytes / self.parameters,
                            time.perf_counter() - start)


def embed_all(embed: Embed, batches: Sequence[dict]) -> Tensor:
    """(sentences, H) float32 embeddings of all `batches`, in order."""
    return torch.cat([embed(batch).float() for batch in batches])


def module_embed(model: nn.Module) -> Embed:
    """A torch encoder's sentence embeddings, as the recipe's task computes them (no grad)."""
    task = EmbeddingTask()
    model.eval()

    def embed(batch: dict) -> Tensor:
        with torch.no_grad():
            return task.forward(model, batch)
    return embed


def onnx_embed(onnx_path: Path, threads: int | None) -> Embed:
    """The sentence embeddings of an ONNX encoder graph ((input_ids, attention_mask) -> last hidden states)
    run by ONNX Runtime: the same mean pooling and normalization as `module_embed`."""
    from benchmarks.peers import onnxruntime_peer as ort

    run = ort.session_function(onnx_path, threads)

    def embed(batch: dict) -> Tensor:
        hidden = run([batch["input_ids"], batch["attention_mask"]]).float()
        return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    return embed


def torch_encoder(label: str, model: nn.Module, quantize_s: float | None, settings: str,
                  weight_bytes: int | None = None) -> Encoder:
    """A torch encoder as a candidate; its weight bytes are its parameters' unless given."""
    size = tensor_bytes(dict(model.named_parameters())) if weight_bytes is None else weight_bytes
    return Encoder(label, module_embed(model), size, quantize_s, settings)


def qat_file_encoder(label: str, path: Path, seconds: float | None, settings: str) -> Encoder:
    """A qat int4 file, loaded by `qat.load` (default kernels), as a candidate; every tensor it stores counted."""
    return torch_encoder(label, load(path, device="cpu"), seconds, settings, weight_bytes=qat_file_bytes(path))


class Context:
    """What the sections share: the recipe, its int4 file, the reference sentences, a scratch folder."""

    def __init__(self, recipe_path: str, file: Path, work: Path, overrides: list[str], groups: Sequence[int]):
        self.recipe_path, self.overrides, self.file, self.work = recipe_path, overrides, file, work
        self.groups = list(groups)
        self.recipe = load_recipe(recipe_path, overrides)
        self.float_model = load_float_model(self.recipe).eval()
        self.data = EvalSources(self.recipe, file, None).datamodule()
        self.reference = EmbeddingReference.from_batches(domain_batches(self.data), self.float_model)

    def calibration_batches(self) -> list:
        return calibration_batches(self.recipe, self.data)

    def fresh_float(self) -> nn.Module:
        return load_float_model(self.recipe).eval()


def calibration_batches(recipe, datamodule) -> list:
    """The batches the recipe calibrates (and GPTQ-rounds) on: the first `schedule.calibration_batches`."""
    return list(islice(calibration_loader(datamodule), recipe.schedule.calibration_batches))


def domain_batches(datamodule) -> dict[str, list[dict]]:
    """The data module's validation batches by domain: its own held-out sentences, then each evaluation domain."""
    return {name or HELD_OUT: list(loader) for name, loader in validation_loaders(datamodule).items()}


def attempt(label: str, make: Callable[..., Encoder], *args) -> Encoder | Failed:
    """`make(*args)`, or a row naming the error when the tool refuses or fails."""
    try:
        return make(*args)
    except Exception as err:  # a peer's failure is a result to report
        traceback.print_exc()
        return Failed(label, _first_line(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _timed(make: Callable[[], str]) -> tuple[str, float]:
    start = time.perf_counter()
    settings = make()
    return settings, time.perf_counter() - start


def qat_rows(ctx: Context) -> Iterator[Encoder | Failed]:
    """float (float32 and bfloat16), qat RTN, GPTQ, GPTQ with float embedding tables, the recipe's file."""
    yield torch_encoder("float (fp32)", ctx.float_model, None, "the recipe's float model, float32")
    bf16 = copy.deepcopy(ctx.float_model).to(torch.bfloat16)
    yield torch_encoder("float (bf16)", bf16, None, "the float model cast to bfloat16 (torchao's rows run in it)")
    variants = (*QAT_PTQ, ("qat GPTQ, embedding tables float", [FLOAT_EMBEDDINGS]))
    for label, path, seconds, settings in qat_ptq_files(ctx, variants):
        yield qat_file_encoder(label, path, seconds, settings)


def qat_file_rows(ctx: Context) -> Iterator[Encoder | Failed]:
    """The recipe's int4 file (GPTQ start, QAT + KD) in `qat.load`, and exported to ONNX, run by ONNX Runtime."""
    yield qat_file_encoder("qat recipe file (QAT + KD)", ctx.file, run_seconds(ctx.file),
                           f"{Path(ctx.recipe_path).name}; quantize time: the run's training (summary.json)")
    from benchmarks.peers import onnxruntime_peer as ort

    yield attempt("qat recipe file -> ONNX, in ONNX Runtime", _qat_onnx, ort, ctx.file, ctx.work / "qat.onnx",
                  torch.get_num_threads())


def torchao_rows(ctx: Context) -> Iterator[Encoder | Failed]:
    """torchao's int4 weight-only PTQ (its CPU config, bf16 activations) at each group, min-max and HQQ."""
    from benchmarks.peers import torchao_peer as tao

    for group in ctx.groups:
        for algorithm in ("minmax", "hqq"):
            label = f"torchao int4 weight-only g{group}, {algorithm} (bf16)"
            yield attempt(label, _torchao_ptq, tao, ctx, label, group, algorithm)


def _torchao_ptq(tao, ctx: Context, label: str, group: int, algorithm: str) -> Encoder:
    model = ctx.fresh_float()
    settings, seconds = _timed(lambda: tao.ptq(model, group, algorithm))
    return torch_encoder(label, model, seconds, settings, weight_bytes=tao.weight_bytes(model))


def onnxruntime_rows(ctx: Context) -> Iterator[Encoder | Failed]:
    """ONNX Runtime's MatMulNBits quantizer on the float ONNX encoder."""
    from benchmarks.peers import onnxruntime_peer as ort

    threads = torch.get_num_threads()
    start = time.perf_counter()
    float_onnx = ort.export_encoder(ctx.fresh_float(), ctx.work / "float.onnx")
    yield Encoder("ONNX Runtime, float", onnx_embed(float_onnx, threads), ort.weight_bytes(float_onnx),
                  time.perf_counter() - start, "the float encoder traced to ONNX (input_ids, attention_mask -> "
                  "last_hidden_state)")
    for algorithm, group, embedding in ort_settings(ctx.groups):
        label = f"ONNX Runtime MatMulNBits {algorithm.upper()} g{group}" + (", embeddings too" if embedding else "")
        out = ctx.work / f"ort-{algorithm}-{group}{'-emb' if embedding else ''}.onnx"
        yield attempt(label, _ort_quantized, ort, float_onnx, out, label, (algorithm, group, embedding), threads)


def ort_settings(groups: Sequence[int]) -> list[tuple[str, int, bool]]:
    """(algorithm, block size, quantize the embedding tables): RTN and HQQ at every group; at the first group
    also RTN with the tables (GatherBlockQuantized) and the Intel Neural Compressor RTN."""
    settings = [(algorithm, group, False) for group in groups for algorithm in ("rtn", "hqq")]
    return [*settings, ("rtn", groups[0], True), ("rtn_inc", groups[0], False)]


def _ort_quantized(ort, float_onnx: Path, out: Path, label: str, setting: tuple[str, int, bool],
                   threads: int) -> Encoder:
    algorithm, group, embedding = setting
    settings, seconds = _timed(lambda: ort.quantize(float_onnx, out, group, algorithm, quantize_embedding=embedding))
    return Encoder(label, onnx_embed(out, threads), ort.weight_bytes(out), seconds, settings)


def _qat_onnx(ort, file: Path, out: Path, threads: int) -> Encoder:
    ids = torch.zeros(1, 16, dtype=torch.long)
    _, seconds = _timed(lambda: str(ort.export_qat(file, out, (ids, torch.ones_like(ids)))))
    return Encoder("qat recipe file -> ONNX, in ONNX Runtime", onnx_embed(out, threads), ort.weight_bytes(out),
                   seconds, "`qat export --to onnx` (the file's own codes in MatMulNBits; embedding tables as "
                   "float32 Gathers of the dequantized int4 rows)")


SECTIONS: dict[str, Callable[[Context], Iterator[Encoder | Failed]]] = {
    "qat": qat_rows, "qat-file": qat_file_rows, "torchao": torchao_rows, "onnxruntime": onnxruntime_rows}


def run_section(name: str, ctx: Context) -> list[EmbeddingRow | Failed]:
    """Every row of one section, scored; an error that ends the section becomes a row saying what failed."""
    rows: list[EmbeddingRow | Failed] = []
    try:
        for item in SECTIONS[name](ctx):
            rows.append(ctx.reference.score(item) if isinstance(item, Encoder) else item)
            print(describe(rows[-1]), flush=True)
    except Exception as err:  # e.g. the peer is not installed: a row, not a crash of the comparison
        traceback.print_exc()
        rows.append(Failed(name, _first_line(err)))
    return rows


def describe(row: EmbeddingRow | Failed) -> str:
    if isinstance(row, Failed):
        return f"{row.label}: failed: {row.error}"
    figures = ", ".join(f"{d} {row.cosine[d]:.4f} / {row.nn_agreement[d]:.3f}" for d in row.cosine)
    return f"{row.candidate.label}: {figures}, {row.bits_per_weight:.2f} bits"


def markdown_table(reference: EmbeddingReference, rows: Sequence[EmbeddingRow | Failed]) -> str:
    """One row per candidate: cosine / NN agreement per domain, bits per weight, quantize time."""
    domains = list(reference.batches)
    head = " | ".join(f"{d} ({reference.sentences(d)}): cosine / NN" for d in domains)
    lines = [f"| tool, setting | {head} | bits/weight | quantize |", "| --- |" + " ---: |" * (len(domains) + 2)]
    for row in rows:
        if isinstance(row, Failed):
            lines.append(f"| {row.label} | failed: {row.error} |" + " |" * (len(domains) + 1))
            continue
        figures = " | ".join(f"{row.cosine[d]:.4f} / {row.nn_agreement[d]:.3f}" for d in domains)
        took = "" if row.candidate.quantize_s is None else duration(row.candidate.quantize_s)
        lines.append(f"| {row.candidate.label} | {figures} | {row.bits_per_weight:.2f} | {took} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True, type=Path, help="the recipe's int4 file (its run's model.safetensors)")
    parser.add_argument("--recipe", default="recipes/minilm_w4_kd.yaml")
    parser.add_argument("--groups", nargs="+", type=int, default=[128, 64], help="the peers' group sizes")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", default=None, help="write the record to this markdown file")
    args, overrides = parser.parse_known_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qat-peers-minilm-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args.recipe, args.file, work, overrides, args.groups)
        rows = [row for name in SECTIONS if name not in args.skip for row in run_section(name, ctx)]
    write_record("all-MiniLM-L6-v2: qat beside the tools users pick instead", time.perf_counter() - started,
                 markdown_table(ctx.reference, rows), rows, args.output)


if __name__ == "__main__":
    main()
