"""`qat eval` on Hugging Face models (the tiny local Llama and BERT of tests/qat/hf, no download): a causal-LM
run ends with its report, `qat eval` reads its int4 export, an encoder run reports embedding agreement."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qat.cli import main
from qat.eval.evaluate import SLICES_NOT_FOR_LMS
from qat.recipe import load_recipe
from qat.run.models import load_float_model
from qat.run.train import train
from tests.qat.hf.test_train_hf import LLAMA
from tests.qat.hf.tiny_models import save_tiny_bert, save_tiny_llama

pytestmark = pytest.mark.slow
LM_PLOTS = ("layers.png", "reliability.png", "robustness.png", "size.png")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny Llama through train(): 6 QAT+KD steps, int4 export, the report at the end."""
    base = tmp_path_factory.mktemp("hf_eval")
    folder = save_tiny_llama(base / "tiny_llama")
    recipe = load_recipe(None, [*LLAMA, f"model.hf.path={folder}", f"logging.run_dir={base / 'runs'}",
                                "export.enabled=true", "report.enabled=true", "report.latency=false",
                                "report.noise_levels=[0.0,0.2]"])
    summary = train(recipe, quiet=True)
    return recipe, summary, base / "runs" / "run" / "version_0"


def _perplexity_by_hand(model, batches) -> float:
    """exp(mean next-token cross entropy): position t scores token t+1 of each block."""
    losses = []
    with torch.no_grad():
        for batch in batches:
            logits = model.eval()(input_ids=batch["input_ids"]).logits[:, :-1]
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                                          reduction="none"))
    return math.exp(float(torch.cat(losses).mean()))


def test_causal_lm_run_ends_with_a_perplexity_report(lm_run):
    recipe, summary, run_dir = lm_run
    report = json.loads((run_dir / "report.json").read_text())
    assert summary["report"]["path"] == str(run_dir / "report.md")
    assert report["task"] == "causal_lm" and report["metric"] == "perplexity"
    assert set(report["stages"]) == {"float", "ptq", "qat", "int4"}
    for name in LM_PLOTS:
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "slices.png").exists()
    # the float reference is the pretrained model itself (a Hugging Face run writes no float.safetensors)
    from qat.run.build import make_datamodule

    data = make_datamodule(recipe)
    data.setup("fit")
    batches = list(data.val_dataloader())
    by_hand = _perplexity_by_hand(load_float_model(recipe), batches)
    float_row = report["stages"]["float"]
    assert float_row["perplexity"] == pytest.approx(by_hand, rel=1e-5)
    assert report["examples"] == sum(b["input_ids"][:, 1:].numel() for b in batches)
    assert (float_row["agreement"], float_row["kl"], float_row["perplexity_ratio"]) == (1.0, 0.0, 1.0)
    # the same figures the run measured with torchmetrics (QAT model, int4 file loaded back)
    assert report["stages"]["qat"]["perplexity"] == pytest.approx(summary["qat"]["ppl"], rel=1e-4)
    assert report["stages"]["int4"]["perplexity"] == pytest.approx(summary["int4"]["ppl"], rel=1e-4)
    ptq = report["stages"]["ptq"]
    assert ptq["perplexity_ratio"] == pytest.approx(ptq["perplexity"] / float_row["perplexity"], rel=1e-6)
    assert 0.0 < ptq["agreement"] < 1.0 and ptq["kl"] > 0.0
    robust = report["robustness"]
    assert robust["metric"] == "perplexity" and "token substitution" in robust["perturbation"]
    assert robust["stages"]["float"][0] == pytest.approx(float_row["perplexity"], rel=1e-6)
    assert robust["stages"]["float"][1] > robust["stages"]["float"][0]  # 20% random tokens hurt
    unk = data.tokenizer.unk_token_id
    dropout = report["robustness_dropout"]  # the same levels, tokens replaced by the unknown token instead
    assert f"token dropout (level: share of tokens replaced by token {unk})" == dropout["perturbation"]
    assert dropout["stages"]["int4"][0] == robust["stages"]["int4"][0]
    assert dropout["stages"]["int4"][1] != robust["stages"]["int4"][1]
    layers = {row["layer"] for row in report["layers"]["output_error"]["int4"]}
    assert {"model.layers.0.self_attn.q_proj", "lm_head"} <= layers
    md = (run_dir / "report.md").read_text()
    assert SLICES_NOT_FOR_LMS in md and "next tokens scored" in md and "Per-class" not in md
    assert "perplexity under typo-style token substitution" in md and "perplexity under token dropout" in md


def test_qat_eval_reads_the_causal_lm_export(lm_run, tmp_path, capsys):
    _, _, run_dir = lm_run
    code = main(["eval", str(run_dir / "model.safetensors"), "-o", str(tmp_path), "--no-latency",
                 "--noise", "0", "0.1", "--budget-bits", "3"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "perplexity_ratio" in out and "report:" in out
    report = json.loads((tmp_path / "report.json").read_text())
    run_report = json.loads((run_dir / "report.json").read_text())
    assert set(report["stages"]) == {"float", "ptq", "int4"}
    for stage in ("float", "ptq", "int4"):  # same file, same data, same numbers as at the end of the run
        assert report["stages"][stage]["perplexity"] == pytest.approx(run_report["stages"][stage]["perplexity"],
                                                                       rel=1e-6), stage
    suggestion = report["sensitivity"]["suggestion"]
    assert suggestion["average_bits"] <= 3.0 and "quant.rules=[" in suggestion["override"]
    assert report["size"]["float_bytes"] > report["size"]["int4_bytes"]


def test_encoder_run_reports_cosine_and_neighbour_agreement(tmp_path):
    folder = save_tiny_bert(tmp_path / "tiny_bert")
    recipe = load_recipe(None, [
        "task=embedding", f"model.hf={{path: {folder}, kind: encoder}}",
        "data._target_=qat.data.SentenceDataModule",
        "data.args={max_length: 24, batch_size: 8, val_sentences: 32, max_train_sentences: 64}",
        "quant.weight={bits: 4, symmetric: false, group_size: 32, quantizer: lsq_plus, init: minmax}",
        "schedule={warmup_steps: 0, calibration_batches: 2}",
        "distill={enabled: true, teacher: initial, task_weight: 0.0, embedding_loss: cosine}",
        "optimizer={lr: 1e-3}", "trainer={max_steps: 4, max_epochs: 1}", "export.enabled=true",
        "report={enabled: true, latency: true, noise_levels: [0.0, 0.2], budget_bits: 3}",
        f"logging={{wandb: disabled, progress_bar: false, run_dir: {tmp_path}}}"])
    summary = train(recipe, quiet=True)
    run_dir = tmp_path / "run" / "version_0"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["metric"] == "cosine" and report["examples"] == 32
    assert report["stages"]["float"] == {"cosine": pytest.approx(1.0), "nn_agreement": 1.0, "count": 32}
    for stage in ("qat", "int4"):  # the run's own torchmetrics figures over the same 32 sentences
        assert report["stages"][stage]["cosine"] == pytest.approx(summary[stage]["cosine"], abs=1e-5), stage
        assert report["stages"][stage]["nn_agreement"] == pytest.approx(summary[stage]["nn_agreement"]), stage
    assert 0.5 < report["stages"]["ptq"]["cosine"] < 1.0
    assert set(report["not_applicable"]) == {"calibration", "slices", "flips", "sensitivity"}
    assert report["robustness"]["stages"]["float"][0] == pytest.approx(1.0)
    for name in ("layers.png", "robustness.png", "size.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "reliability.png").exists()
    assert [row["batch"] for row in report["latency"]["rows"]] == [1, 8]  # an encoder is timed too
    md = (run_dir / "report.md").read_text()
    assert "## Not measured for this model" in md and "no ECE or reliability diagram" in md


def test_bad_input_for_a_hugging_face_run_is_named(lm_run, tmp_path, capsys):
    _, _, run_dir = lm_run
    assert main(["eval", str(run_dir), "-o", str(tmp_path), "model.hf.path=/nowhere/tiny_llama"]) == 2
    assert "model path '/nowhere/tiny_llama'" in capsys.readouterr().err  # the float reference cannot be loaded
    assert main(["eval", str(run_dir), "-o", str(tmp_path), "data.args.seq_len=128"]) == 2
    assert "seq_len" in capsys.readouterr().err  # the model has 64 positions
