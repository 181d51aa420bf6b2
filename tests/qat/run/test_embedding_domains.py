"""Evaluation domains of a sentence encoder (`SentenceDataModule(eval_corpora=...)`) through a whole run on the
tiny local BERT: every validation logs `val/cosine/<domain>` and `val/nn_agreement/<domain>`, summary.json's
fp / rtn / ptq / qat / int4 rows have `cosine/<domain>` and `nn_agreement/<domain>` and the % of the
round-to-nearest cosine gap recovered per domain, and the report has one row per domain."""

from __future__ import annotations

import csv
import json
import math

import pytest

from qat.data.loading import validation_loaders
from qat.eval.metrics import gap_recovered, mean_cosine
from qat.eval.outputs import collect_embeddings
from qat.recipe import load_recipe
from qat.run.train import domain_gaps, train
from qat.tasks import make_task
from tests.qat.hf.tiny_models import save_tiny_bert

pytestmark = pytest.mark.slow
NOTES = " ".join(f"the value {i} of a function is an object it can return." for i in range(40))


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory):
    """4 QAT+KD steps with GPTQ rounding (so there is an rtn row), two evaluation domains, export and report."""
    base = tmp_path_factory.mktemp("embedding_domains")
    bert_folder = save_tiny_bert(base / "tiny_bert")
    notes = base / "notes.txt"
    notes.write_text(NOTES, encoding="utf-8")
    recipe = load_recipe(None, [
        "task=embedding", f"model.hf={{path: {bert_folder}, kind: encoder}}",
        "data._target_=qat.data.SentenceDataModule",
        "data.args={max_length: 24, batch_size: 8, val_sentences: 16, max_train_sentences: 64, eval_sentences: 12}",
        f"data.args.eval_corpora=[sklearn:descr, {{name: notes, files: [{notes}]}}]",
        "quant.weight={bits: 4, symmetric: false, group_size: 32, quantizer: lsq_plus, init: minmax}",
        "schedule={warmup_steps: 0, calibration_batches: 2, weight_rounding: gptq}",
        "distill={enabled: true, teacher: initial, task_weight: 0.0, embedding_loss: cosine}",
        "optimizer={lr: 1e-3}", "trainer={max_steps: 4, max_epochs: 1, val_check_interval: 2}",
        f"logging={{wandb: disabled, progress_bar: false, run_dir: {base / 'runs'}}}",
        "export.enabled=true", "report.enabled=true", "report.latency=false", "report.noise_levels=[0.0]"])
    summary = train(recipe, quiet=True)
    return recipe, summary, base / "runs" / "run" / "version_0"


def test_every_stage_row_has_a_cosine_and_nn_agreement_per_domain(domain_run):
    _, summary, run_dir = domain_run
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    keys = {"cosine", "nn_agreement", "cosine/science", "nn_agreement/science", "cosine/notes", "nn_agreement/notes"}
    for stage in ("fp", "rtn", "ptq", "qat", "int4"):
        assert set(summary[stage]) == keys, stage
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 + 1e-6 for v in summary[stage].values())
    assert all(summary["fp"][key] == pytest.approx(1.0, abs=1e-5) for key in keys)  # float against itself
    assert summary["rtn"]["cosine/science"] < 1.0 and summary["rtn"]["cosine/science"] != summary["rtn"]["cosine/notes"]
    gaps = summary["gap_recovered_by_domain"]
    assert list(gaps) == ["", "science", "notes"] and gaps == domain_gaps(summary, "cosine")
    for domain, gap in gaps.items():
        key = f"cosine/{domain}" if domain else "cosine"
        fp, rtn = summary["fp"][key], summary["rtn"][key]
        assert rtn < fp
        for stage in ("qat", "int4"):
            expected = round(100 * (summary[stage][key] - rtn) / (fp - rtn), 2)
            assert gap[stage] == pytest.approx(expected), (domain, stage)


def test_the_summary_rows_are_the_cosines_on_the_domain_loaders(domain_run):
    from qat.run.build import make_datamodule
    from qat.run.models import load_float_model

    recipe, summary, _ = domain_run
    data = make_datamodule(recipe)
    data.setup("fit")
    loaders = validation_loaders(data)
    assert list(loaders) == ["", "science", "notes"]
    assert len(data.domain_sets["science"]) == 12 and len(data.domain_sets["notes"]) == 12
    trained = set(data.train_set.sentences)
    assert not any(set(sentences.sentences) & trained for sentences in data.domain_sets.values())
    import qat

    task = make_task("embedding")
    float_model, int4 = load_float_model(recipe), qat.load(summary["export"]["path"])
    for domain in ("science", "notes"):
        batches = list(loaders[domain])
        reference = collect_embeddings(float_model, batches, task)
        assert reference.shape[0] == 12
        cosine = mean_cosine(collect_embeddings(int4, batches, task), reference)
        assert summary["int4"][f"cosine/{domain}"] == pytest.approx(cosine, abs=1e-4)


def test_every_validation_logs_one_readable_name_per_domain(domain_run):
    _, _, run_dir = domain_run
    with open(next(run_dir.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    assert {"val/cosine", "val/nn_agreement", "val/cosine/science", "val/nn_agreement/science", "val/cosine/notes",
            "val/nn_agreement/notes"} <= columns
    assert not [c for c in columns if "dataloader_idx" in c]
    logged = [r for r in rows if r.get("val/cosine/notes")]
    assert len(logged) >= 2 and all(r["val/cosine"] and r["val/nn_agreement/science"] for r in logged)  # steps 2, 4


def test_the_report_has_one_row_per_domain_with_the_gap_recovered(domain_run):
    _, summary, run_dir = domain_run
    report = json.loads((run_dir / "report.json").read_text())
    domains = report["domains"]
    assert list(domains) == ["", "science", "notes"]
    assert domains[""]["cosine"] == {s: row["cosine"] for s, row in report["stages"].items()}
    assert domains["science"]["sentences"] == 12 and domains["notes"]["sentences"] == 12
    assert domains["notes"]["cosine"]["float"] == pytest.approx(1.0, abs=1e-5)
    # qat and int4 are the run's own models: the same figures as summary.json's rows
    assert domains["notes"]["cosine"]["qat"] == pytest.approx(summary["qat"]["cosine/notes"], abs=1e-5)
    assert domains["science"]["cosine"]["int4"] == pytest.approx(summary["int4"]["cosine/science"], abs=1e-4)
    assert domains["science"]["nn_agreement"]["qat"] == pytest.approx(summary["qat"]["nn_agreement/science"])
    for row in domains.values():
        cosine = row["cosine"]
        assert cosine["ptq"] < cosine["float"]  # a 4-bit tiny BERT is worse than float everywhere: a gap to recover
        assert row["gap_recovered"]["qat"] == pytest.approx(gap_recovered(cosine["float"], cosine["ptq"],
                                                                          cosine["qat"]))
    markdown = (run_dir / "report.md").read_text()
    assert "## Embeddings by domain" in markdown
    table = markdown.split("## Embeddings by domain")[1].split("\n\n")[2].splitlines()
    assert table[0] == ("| domain | sentences | float cosine | PTQ cosine | QAT cosine | int4 file cosine | "
                        "float NN agreement | PTQ NN agreement | QAT NN agreement | int4 file NN agreement | "
                        "QAT % gap recovered | int4 file % gap recovered |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| training text (held-out end)", "| science", "| notes"]
    assert table[3].split(" | ")[1] == "12"
