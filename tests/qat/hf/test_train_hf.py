"""A tiny Llama (tied embeddings) and a tiny BERT through a whole recipe: QAT + distillation, export, qat.load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import qat
from qat.export.reader import read_header
from qat.ptq import gptq_round
from qat.recipe import load_recipe
from qat.run.build import build
from qat.run.export import export_run
from qat.run.train import summarize
from tests.qat.hf.tiny_models import save_tiny_llama

LLAMA = [
    "task=causal_lm",
    "data._target_=qat.data.TextDataModule",
    "data.args={seq_len: 16, batch_size: 4, val_tokens: 256, max_train_blocks: 64}",
    "quant.weight={bits: 4, symmetric: false, group_size: 64, quantizer: lsq_plus, init: minmax}",
    "quant.rules=[]",
    "schedule={warmup_steps: 0, calibration_batches: 2}",
    "distill={enabled: true, teacher: initial, temperature: 1.0, task_weight: 0.0}",
    "optimizer={lr: 1e-3, quantizer_lr: 1e-3, lr_warmup_steps: 2}",
    "trainer={max_steps: 6, max_epochs: 1, limit_val_batches: 2}",
    "logging={wandb: disabled, progress_bar: false, telemetry_every_n_steps: 3}",
]


def llama_recipe(tmp_path, folder, *extra):
    return load_recipe(None, [*LLAMA, f"model.hf.path={folder}", f"logging.run_dir={tmp_path}", *extra])


def fit(recipe):
    run = build(recipe)
    run.trainer.fit(run.module, datamodule=run.datamodule, weights_only=True)
    return run


@pytest.mark.slow
def test_label_free_kd_run_exports_a_file_that_rebuilds_the_transformer(tmp_path, llama_folder):
    run = fit(llama_recipe(tmp_path, llama_folder))
    summary = summarize(run, 0.0)
    assert set(summary["fp"]) == {"ppl", "loss"} and set(summary["ptq"]) == {"ppl", "loss"}
    summary.update(export_run(run))
    path = summary["export"]["path"]
    header = read_header(path)
    tied = json.loads(header.metadata["qat.tied"])
    assert tied["lm_head.weight_packed"] == "model.embed_tokens.weight_packed"  # the table is stored once
    assert "lm_head.weight_packed" not in header.tensors
    architecture = json.loads(header.metadata["qat.architecture"])
    assert architecture["hf_config"]["architectures"] == ["LlamaForCausalLM"]
    assert architecture["hf_source"]["path"] == str(llama_folder)

    loaded = qat.load(path, kernel_backend="reference")  # no other argument: rebuilt from the file
    assert isinstance(loaded, LlamaForCausalLM)
    assert loaded.lm_head.weight_packed is loaded.model.embed_tokens.weight_packed
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = run.model.eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)  # the reference kernel reproduces the fake-quant model bit for bit
    # export_run evaluates with the default kernel, which rounds activations to bf16: close, not equal
    qat_ppl = run.module.evaluate(run.datamodule.val_dataloader())["ppl"]
    assert summary["int4"]["ppl"] == pytest.approx(qat_ppl, rel=5e-3)


def encoder_recipe(tmp_path, folder, *extra):
    return load_recipe(None, [
        "task=embedding", f"model.hf={{path: {folder}, kind: encoder}}",
        "data._target_=qat.data.SentenceDataModule",
        "data.args={max_length: 24, batch_size: 8, val_sentences: 32, max_train_sentences: 64}",
        "quant.weight={bits: 4, symmetric: false, group_size: 32, quantizer: lsq_plus, init: minmax}",
        "schedule={warmup_steps: 0, calibration_batches: 2}",
        "distill={enabled: true, teacher: initial, task_weight: 0.0, embedding_loss: cosine}",
        "optimizer={lr: 1e-3}", "trainer={max_steps: 4, max_epochs: 1}",
        f"logging={{wandb: disabled, progress_bar: false, run_dir: {tmp_path}}}", *extra])


@pytest.mark.slow
def test_encoder_distils_sentence_embeddings(tmp_path, bert_folder):
    run = fit(encoder_recipe(tmp_path, bert_folder))
    summary = summarize(run, 0.0)
    assert summary["fp"]["cosine"] == pytest.approx(1.0, abs=1e-6) and summary["fp"]["nn_agreement"] == 1.0
    assert 0.5 < summary["ptq"]["cosine"] < 1.0 and 0.5 < summary["qat"]["cosine"] < 1.0


@pytest.mark.slow
def test_gptq_weight_rounding_runs_at_calibration_on_the_calibration_batches(tmp_path, bert_folder, monkeypatch):
    import qat.lightning.schedule as schedule_module

    calls = []

    def spy(model, batches, damping, act_order):
        losses = gptq_round(model, batches, damping, act_order)
        calls.append((len(batches), damping, act_order, sorted(losses)))
        return losses

    monkeypatch.setattr(schedule_module, "gptq_round", spy)
    nearest = summarize(fit(encoder_recipe(tmp_path / "nearest", bert_folder, "trainer.max_steps=1")), 0.0)
    assert calls == [] and nearest["rtn"] is None
    run = fit(encoder_recipe(tmp_path / "gptq", bert_folder, "schedule.weight_rounding=gptq",
                             "schedule.gptq_damping=0.05", "schedule.gptq_act_order=true", "trainer.max_steps=1"))
    linears = sorted(name for name, m in run.model.named_modules() if isinstance(m, qat.QuantLinear))
    assert calls == [(2, 0.05, True, linears)]  # once, on the 2 calibration batches, every quantized Linear
    summary = summarize(run, 0.0)
    assert 0.5 < summary["ptq"]["cosine"] < 1.0
    assert summary["rtn"] == nearest["ptq"]  # before GPTQ, the same calibrated round-to-nearest model, measured alike


def test_eval_ptq_stage_rounds_like_the_run(tmp_path, bert_folder, monkeypatch):
    """`qat eval`'s PTQ model takes the recipe's GPTQ settings (damping, act-order), as the run's schedule does."""
    import itertools

    import qat.run.eval_sources
    from qat.run.eval_sources import EvalSources

    calls = []

    def spy(model, batches, damping, act_order):
        calls.append((len(batches), damping, act_order))
        return gptq_round(model, batches, damping, act_order)

    monkeypatch.setattr(qat.run.eval_sources, "gptq_round", spy)
    recipe = encoder_recipe(tmp_path, bert_folder, "schedule.weight_rounding=gptq", "schedule.gptq_damping=0.05",
                            "schedule.gptq_act_order=true")
    sources = EvalSources(recipe, tmp_path, None)
    batches = list(itertools.islice(iter(sources.datamodule().train_dataloader()), 2))
    sources.ptq_model(batches)
    assert calls == [(2, 0.05, True)]


@pytest.mark.slow
def test_generate_from_the_int4_file_greedy_and_sampled(tmp_path, llama_folder, capsys):
    from qat.cli import main
    from qat.export import export_model
    from qat.hf.generate import generate, tokenizer_for
    from qat.run.models import architecture_of, build_model

    recipe = llama_recipe(tmp_path, llama_folder)
    model, _ = build_model(recipe)
    from qat.control import calibrate

    calibrate(model, [{"input_ids": torch.randint(0, 64, (2, 8))}])
    path = tmp_path / "tiny.safetensors"
    export_model(model, path, architecture=architecture_of(recipe, model))
    loaded = qat.load(path, kernel_backend="reference")
    tokenizer = tokenizer_for(str(path))
    greedy = generate(loaded, tokenizer, "the value of a function", max_new_tokens=6)
    again = generate(loaded, tokenizer, "the value of a function", max_new_tokens=6)
    assert greedy.new_tokens == 6 and greedy.text == again.text  # greedy is deterministic
    ids = tokenizer("the value of a function", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # greedy's first token is the fake-quant model's argmax
        first = model.eval()(input_ids=ids).logits[0, -1].argmax()
    assert tokenizer.decode([int(first)], skip_special_tokens=True) in greedy.text
    sampled = generate(loaded, tokenizer, "the value of a function", max_new_tokens=6, sample=True, seed=1)
    assert sampled.new_tokens == 6
    assert main(["generate", str(path), "the value", "--max-new-tokens", "3", "--backend", "reference"]) == 0
    assert "decode_tokens_per_s" in capsys.readouterr().err


def test_bad_data_fails_before_the_run_directory_is_written(tmp_path, llama_folder):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty"):
        build(llama_recipe(tmp_path / "runs", llama_folder, f"data.args.files=[{empty}]"))
    with pytest.raises(ValueError, match=r"seq_len"):
        build(llama_recipe(tmp_path / "runs", llama_folder, "data.args.seq_len=128"))  # the model has 64 positions
    small = save_tiny_llama(tmp_path / "small_vocab", vocab_size=16)  # the word tokenizer has 39 ids
    with pytest.raises(ValueError, match=r"vocab"):
        build(llama_recipe(tmp_path / "runs", small))
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_train_runs_the_hf_recipe_end_to_end_and_prints_float_rtn_and_qat_side_by_side(tmp_path, llama_folder):
    from qat.run.train import train

    summary = train(llama_recipe(tmp_path, llama_folder, "export.enabled=true"), quiet=True)
    for stage in ("fp", "ptq", "qat", "int4"):
        assert summary[stage]["ppl"] > 1.0, stage
    run_dir = tmp_path / "run" / "version_0"
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / "float.safetensors").exists()
