"""SmolLM2-135M through qat and through the tools a user would pick instead, scored on the same text.

Rows (each peer is run by its own code, at the settings a careful user would choose; a peer that is not
installed or fails gets a row with its error):

- float; qat round-to-nearest (min-max group ranges); qat GPTQ (the recipe's spec and calibration);
  qat's recipe file (GPTQ start, QAT + KD) in `qat.load`, and the same file exported to GGUF (run by
  llama.cpp) and to ONNX (run by ONNX Runtime);
- torchao: int4 weight-only PTQ at group 64 and at its default group, min-max and HQQ parameters;
  its own QAT flow (prepare -> the recipe's training loop -> convert) on the same data, steps, lr and KD;
- llama.cpp: the float model converted by llama.cpp and quantized by it to Q4_0 and Q4_K_M, without and
  with an importance matrix computed on the recipe's training text;
- ONNX Runtime's MatMulNBits quantizer (RTN and HQQ) on the float ONNX model.

Text: the recipe's held-out training text and its evaluation domains (`--tokens` tokens each, the same
blocks for every row). Figures: see `harness.py`. The float weights of this model are themselves a
dequantized Q4_1 GGUF (groups of 32, min and scale): a quantizer using that grid can land on the float
weights exactly, which favours llama.cpp's 32-wide blocks (the note of the record says how much).

Usage (about an hour on two cores, most of it torchao's QAT run; `--skip torchao-qat` for the rest):
    .venv/bin/python -m benchmarks.peers.smollm2 --file runs/smollm2_w4_kd/version_0/model.safetensors \\
        [--recipe recipes/smollm2_w4_kd.yaml] [--tokens 8192] [--skip NAME ...] [--output benchmarks/peers/smollm2.md]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch

from benchmarks.peers.harness import (
    Candidate,
    Failed,
    Reference,
    Row,
    markdown_table,
    qat_file_bytes,
    torch_candidate,
    write_record,
)
from qat.data.loading import calibration_loader, validation_loaders
from qat.export import export_model, load
from qat.hf.load import load_tokenizer
from qat.recipe import load_recipe
from qat.run.eval_sources import EvalSources
from qat.run.models import architecture_of, load_float_model


def held_out_blocks(recipe, tokens: int) -> dict[str, list[list[int]]]:
    """Token-id blocks of the recipe's held-out text and of each evaluation domain, as lm_domains.py
    scores them (its perplexities and these agree)."""
    from benchmarks.models.lm_domains import data_module

    dm = data_module(recipe, list(recipe.data.args.get("eval_corpora", [])), tokens)
    return {name or "held-out": [row for batch in loader for row in _unpadded(batch)]
            for name, loader in validation_loaders(dm).items()}


def _unpadded(batch: dict) -> Iterator[list[int]]:
    mask = batch.get("attention_mask")
    for i, ids in enumerate(batch["input_ids"]):
        yield ids[: int(mask[i].sum())].tolist() if mask is not None else ids.tolist()


class Context:
    """What the peer sections share: the recipe, its file, the reference text, a scratch folder."""

    def __init__(self, recipe_path: str, file: Path, tokens: int, work: Path, overrides: list[str],
                 also: list[str] = ()):
        self.recipe_path, self.overrides, self.file, self.work = recipe_path, overrides, file, work
        self.also = [tuple(entry.split("=", 1)) for entry in also]  # (label, path) of further qat files
        self.recipe = load_recipe(recipe_path, overrides)
        self.float_model = load_float_model(self.recipe).eval()
        self.reference = Reference.from_blocks(held_out_blocks(self.recipe, tokens), self.float_model)
        self._data = None

    def datamodule(self):
        if self._data is None:
            self._data = EvalSources(self.recipe, self.file, None).datamodule()
        return self._data

    def calibration_batches(self) -> list:
        return list(islice(calibration_loader(self.datamodule()), self.recipe.schedule.calibration_batches))

    def training_batches(self) -> list:
        """The batches the recipe trains on, in order (max_steps of them)."""
        return list(islice(self.datamodule().train_dataloader(), self.recipe.trainer.max_steps))

    def fresh_float(self) -> torch.nn.Module:
        return load_float_model(self.recipe).eval()


# qat's post-training rows: (label, recipe overrides); round-to-nearest undoes the recipe's MSE ranges and GPTQ
QAT_PTQ = (("qat round-to-nearest, min-max",
            ["quant.weight.init=minmax", "schedule.weight_rounding=nearest", "schedule.gptq_act_order=false"]),
           ("qat GPTQ (recipe start)", []))


def qat_rows(ctx: Context) -> Iterator[Row | Failed | Candidate]:
    """float, qat RTN and GPTQ (exported and loaded like any int4 file), the recipe's file."""
    yield torch_candidate("float (fp32)", ctx.float_model, None, "the recipe's float model, float32")
    for label, path, seconds, settings in qat_ptq_files(ctx, QAT_PTQ):
        yield _qat_file(label, path, seconds, settings)
    yield _qat_file("qat recipe file (QAT + KD)", ctx.file, run_seconds(ctx.file),
                    f"{Path(ctx.recipe_path).name}; quantize time: the run's training (summary.json), "
                    "text generation not counted")


def qat_ptq_files(ctx, variants) -> Iterator[tuple[str, Path, float, str]]:
    """(label, int4 file, seconds, settings) of qat's post-training quantization of the float model, one per
    (label, recipe overrides) variant: the recipe's spec, calibrated on its calibration batches, exported.
    `ctx` has recipe_path, overrides, file, work and calibration_batches()."""
    calibration = ctx.calibration_batches()
    for label, extra in variants:
        recipe = load_recipe(ctx.recipe_path, [*ctx.overrides, *extra])
        spec = recipe.quant.weight
        start = time.perf_counter()
        model = EvalSources(recipe, ctx.file, None).ptq_model(calibration)
        path = ctx.work / f"{re.sub('[^A-Za-z0-9]+', '-', label).strip('-')}.safetensors"
        export_model(model, path, architecture=architecture_of(recipe, model))
        rules = [entry for entry in extra if entry.startswith("quant.rules")]  # which layers it leaves float
        yield (label, path, time.perf_counter() - start,
               f"int{spec.bits} g{spec.group_size} asymmetric, {recipe.schedule.weight_rounding}, ranges {spec.init}"
               + "".join(f"; `{rule}`" for rule in rules))


def run_seconds(file: Path) -> float | None:
    """The training time of the run that wrote `file` (its summary.json's "seconds"), None without one."""
    summary = file.parent / "summary.json"
    return json.loads(summary.read_text()).get("seconds") if summary.is_file() else None


def also_rows(ctx: Context) -> Iterator[Row | Failed | Candidate]:
    """Further qat int4 files (`--also LABEL=PATH`), e.g. other recipes' runs, scored like the recipe's."""
    for label, path in ctx.also:
        yield _qat_file(label, Path(path), None, f"--also {path}")


def _qat_file(label: str, path: Path, seconds: float | None, settings: str) -> Candidate:
    return torch_candidate(label, load(path, device="cpu"), seconds, settings, weight_bytes=qat_file_bytes(path))


def llama_cpp_rows(ctx: Context) -> Iterator[Row | Failed | Candidate]:
    """llama.cpp's own Q4_0 / Q4_K_M of the float model (with and without an imatrix), and qat's GGUF."""
    from benchmarks.peers import llama_cpp_peer as lc
    from qat.export.targets.gguf import export_gguf
    from qat.hf.load import weights_folder

    threads = torch.get_num_threads()
    context = max(len(b) for blocks in ctx.reference.blocks.values() for b in blocks)
    start = time.perf_counter()
    float_gguf = lc.convert_float(weights_folder(ctx.recipe.model.hf), ctx.work / "float-f32.gguf")
    convert_s = time.perf_counter() - start
    yield Candidate("llama.cpp F32 (its converter)", lc.logits_function(float_gguf, context, threads),
                    lc.weight_bytes(float_gguf), convert_s, "convert_hf_to_gguf.py --outtype f32")
    for kind in ("Q4_0", "Q4_K_M"):
        out = ctx.work / f"llama-{kind}.gguf"
        start = time.perf_counter()
        settings = lc.quantize(float_gguf, out, kind)
        yield Candidate(f"llama.cpp {kind}", lc.logits_function(out, context, threads), lc.weight_bytes(out),
                        time.perf_counter() - start, settings)
    if not lc.tools_built():
        yield Failed("llama.cpp with importance matrix", "llama-imatrix / llama-quantize not built: run `make peers`")
    else:
        text = ctx.work / "calibration.txt"
        tokenizer = load_tokenizer(ctx.recipe.model.hf)
        text.write_text("\n".join(tokenizer.decode(row) for batch in ctx.training_batches()
                                  for row in batch["input_ids"].tolist()))
        start = time.perf_counter()
        imatrix = lc.importance_matrix(float_gguf, text, ctx.work / "imatrix.gguf", context, threads)
        imatrix_s = time.perf_counter() - start
        for kind in ("Q4_0", "Q4_K_M"):
            out = ctx.work / f"llama-{kind}-imatrix.gguf"
            start = time.perf_counter()
            settings = lc.quantize_with_imatrix(float_gguf, imatrix, out, kind, threads)
            yield Candidate(f"llama.cpp {kind} + imatrix", lc.logits_function(out, context, threads),
                            lc.weight_bytes(out), imatrix_s + time.perf_counter() - start, settings)
    out = ctx.work / "qat.gguf"
    start = time.perf_counter()
    export_gguf(ctx.file, out)
    yield Candidate("qat recipe file -> GGUF, in llama.cpp", lc.logits_function(out, context, threads),
                    lc.weight_bytes(out), time.perf_counter() - start, "`qat export --to gguf` (no requantization)")


def onnxruntime_rows(ctx: Context) -> Iterator[Row | Failed | Candidate]:
    """ONNX Runtime's MatMulNBits quantizer on the float ONNX model (RTN at group 64 and at its default 128,
    HQQ at 64), and qat's own ONNX export of the recipe file; all run by ONNX Runtime."""
    from benchmarks.peers import onnxruntime_peer as ort

    threads = torch.get_num_threads()
    start = time.perf_counter()
    float_onnx = ort.export_float(ctx.fresh_float(), ctx.work / "float.onnx")
    yield Candidate("ONNX Runtime, float", ort.session_logits(float_onnx, threads), ort.weight_bytes(float_onnx),
                    time.perf_counter() - start, "the float model traced to ONNX (tied head untied)")
    for algorithm, block in (("rtn", 64), ("rtn", 128), ("hqq", 64)):
        out = ctx.work / f"ort-{algorithm}-{block}.onnx"
        start = time.perf_counter()
        settings = ort.quantize(float_onnx, out, block, algorithm)
        yield Candidate(f"ONNX Runtime MatMulNBits {algorithm.upper()} g{block}", ort.session_logits(out, threads),
                        ort.weight_bytes(out), time.perf_counter() - start, settings)
    out = ctx.work / "qat.onnx"
    start = time.perf_counter()
    ort.export_qat(ctx.file, out)
    yield Candidate("qat recipe file -> ONNX, in ONNX Runtime", ort.session_logits(out, threads),
                    ort.weight_bytes(out), time.perf_counter() - start,
                    "`qat export --to onnx` (the file's own codes in MatMulNBits; embedding a float32 Gather)")


def torchao_rows(ctx: Context) -> Iterator[Row | Failed | Candidate]:
    """torchao's int4 weight-only PTQ of the float model (its CPU path, bf16 activations): group 64 and its
    default group, min-max and HQQ parameters."""
    from benchmarks.peers import torchao_peer as tao

    for group, algorithm in ((64, "minmax"), (64, "hqq"), (tao.default_group_size(), "minmax")):
        label = f"torchao int4 weight-only g{group}, {algorithm} (bf16)"
        model = ctx.fresh_float()
        start = time.perf_counter()
        try:
            settings = tao.ptq(model, group, algorithm)
        except ValueError as err:  # a group size the model's shapes refuse: a row saying so
            yield Failed(label, str(err).splitlines()[0])
            continue
        yield torch_candidate(label, model, time.perf_counter() - start, settings,
                              weight_bytes=tao.weight_bytes(model))


def torchao_qat_rows(ctx: Context) -> Iterator[Row | Failed | Candidate]:
    """torchao's own QAT flow at group 64: prepare, the recipe's training (data, steps, lr, KD), convert."""
    from benchmarks.peers import torchao_peer as tao

    model = ctx.fresh_float()
    start = time.perf_counter()
    tao.qat_prepare(model, 64)
    distill_steps(model, ctx.float_model, ctx.training_batches(), ctx.recipe)
    converted = tao.qat_convert(model, 64)
    cfg = ctx.recipe.optimizer
    yield torch_candidate("torchao QAT g64 (recipe's data, steps, lr, KD; bf16)", model, time.perf_counter() - start,
                          f"{converted}; between them {ctx.recipe.trainer.max_steps} steps of the recipe's batches, "
                          f"AdamW lr {cfg.lr} ({cfg.schedule}, {cfg.lr_warmup_steps} warm-up steps), token KD at "
                          f"temperature {ctx.recipe.distill.temperature}; from the float weights (torchao has no "
                          "GPTQ start)", weight_bytes=tao.weight_bytes(model))


def distill_steps(model: torch.nn.Module, teacher: torch.nn.Module, batches: list, recipe) -> float:
    """The recipe's training, outside Lightning, for a peer's fake-quantized model: AdamW at the recipe's lr
    (its warm-up and cosine schedule), token-level KD from the float teacher at the recipe's temperature,
    one step per batch; the wall seconds."""
    from qat.distill.lm_losses import token_kd_loss
    from qat.lightning.module import lr_factor

    cfg = recipe.optimizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, cfg.lr_warmup_steps, len(batches), cfg.schedule == "cosine", cfg.min_lr_ratio))
    model.train()
    start = time.perf_counter()
    for batch in batches:
        with torch.no_grad():
            target = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        loss = token_kd_loss(logits, target, batch.get("attention_mask"), recipe.distill.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return time.perf_counter() - start


SECTIONS: dict[str, Callable[[Context], Iterator[Row | Failed | Candidate]]] = {
    "qat": qat_rows, "also": also_rows, "torchao": torchao_rows, "torchao-qat": torchao_qat_rows,
    "llama.cpp": llama_cpp_rows, "onnxruntime": onnxruntime_rows}


def run_section(name: str, ctx: Context) -> list[Row | Failed]:
    """Every row of one peer section, scored; an error becomes a row saying what failed."""
    rows: list[Row | Failed] = []
    try:
        for item in SECTIONS[name](ctx):
            rows.append(ctx.reference.score(item) if isinstance(item, Candidate) else item)
            last = rows[-1]
            if isinstance(last, Row):
                print(f"{last.candidate.label}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.perplexity.items())
                      + f", KL {last.kl:.4f}, top-1 {last.top1:.1%}, {last.bits_per_weight:.2f} bits", flush=True)
    except Exception as err:  # a peer's own failure is a result to report, not a crash of the comparison
        traceback.print_exc()
        rows.append(Failed(name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", required=True, type=Path, help="the recipe's int4 file (its run's model.safetensors)")
    parser.add_argument("--recipe", default="recipes/smollm2_w4_kd.yaml")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per domain")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    parser.add_argument("--also", nargs="*", default=[], metavar="LABEL=PATH", help="further qat int4 files to score")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", default=None, help="write the record to this markdown file")
    args, overrides = parser.parse_known_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qat-peers-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args.recipe, args.file, args.tokens, work, overrides, args.also)
        rows = [row for name in SECTIONS if name not in args.skip for row in run_section(name, ctx)]
    write_record("SmolLM2-135M: qat beside the tools users pick instead", time.perf_counter() - started,
                 markdown_table(ctx.reference, rows), rows, args.output)


if __name__ == "__main__":
    main()
