"""Evaluation domains (`data.args.eval_corpora`) through a whole run on the tiny local Llama: every validation
logs `val/ppl/<domain>`, summary.json's fp / rtn / ptq / qat / int4 rows have `ppl/<domain>` and the % of the
round-to-nearest gap recovered per domain, and the report has one row per domain."""

from __future__ import annotations

import csv
import json
import math

import pytest

from qat.data.loading import validation_loaders
from qat.eval.evaluate import streamed_perplexity
from qat.eval.metrics import gap_recovered
from qat.recipe import load_recipe
from qat.run.train import domain_gaps, train
from qat.tasks import make_task
from tests.qat.hf.test_train_hf import LLAMA
from tests.qat.hf.tiny_models import save_tiny_llama

pytestmark = pytest.mark.slow
NOTES = "the value of a function is the object it can return and the class of the module is a name " * 8


@pytest.fixture(scope="module")
def domain_run(tmp_path_factory):
    """6 QAT+KD steps with GPTQ rounding (so there is an rtn row), two evaluation domains, export and report."""
    base = tmp_path_factory.mktemp("domains")
    folder = save_tiny_llama(base / "tiny_llama")
    notes = base / "notes.txt"
    notes.write_text(NOTES, encoding="utf-8")
    recipe = load_recipe(None, [*LLAMA, f"model.hf.path={folder}", f"logging.run_dir={base / 'runs'}",
                                f"data.args.eval_corpora=[sklearn:descr, {{name: notes, files: [{notes}]}}]",
                                "data.args.eval_tokens=64", "schedule.weight_rounding=gptq",
                                "trainer.val_check_interval=3", "export.enabled=true", "report.enabled=true",
                                "report.latency=false", "report.noise_levels=[0.0]"])
    summary = train(recipe, quiet=True)
    return recipe, summary, base / "runs" / "run" / "version_0"


def test_every_stage_row_has_a_perplexity_per_domain(domain_run):
    _, summary, run_dir = domain_run
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for stage in ("fp", "rtn", "ptq", "qat", "int4"):
        assert {"ppl", "loss", "ppl/science", "loss/science", "ppl/notes", "loss/notes"} <= set(summary[stage]), stage
        assert all(math.isfinite(v) and v > 0 for v in summary[stage].values())
    assert summary["fp"]["ppl/science"] != summary["fp"]["ppl/notes"]
    gaps = summary["gap_recovered_by_domain"]
    assert list(gaps) == ["", "science", "notes"] and gaps == domain_gaps(summary)
    for domain, gap in gaps.items():
        key = f"ppl/{domain}" if domain else "ppl"
        fp, rtn = summary["fp"][key], summary["rtn"][key]
        for stage in ("qat", "int4"):
            expected = round(100 * (rtn - summary[stage][key]) / (rtn - fp), 2) if rtn > fp else None
            assert gap[stage] == expected, (domain, stage)


def test_the_summary_rows_are_the_perplexities_of_the_domain_loaders(domain_run):
    from qat.run.build import make_datamodule
    from qat.run.models import load_float_model

    recipe, summary, _ = domain_run
    data = make_datamodule(recipe)
    data.setup("fit")
    loaders = validation_loaders(data)
    assert list(loaders) == ["", "science", "notes"]
    model = load_float_model(recipe)
    task = make_task("causal_lm")
    for domain in ("science", "notes"):
        ppl, tokens = streamed_perplexity(model, list(loaders[domain]), task)
        assert tokens == 4 * 15  # eval_tokens=64 at seq_len 16: 4 blocks, 15 next tokens each
        assert summary["fp"][f"ppl/{domain}"] == pytest.approx(ppl, rel=1e-5)


def test_every_validation_logs_one_readable_name_per_domain(domain_run):
    _, _, run_dir = domain_run
    with open(next(run_dir.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    assert {"val/ppl", "val/loss", "val/ppl/science", "val/loss/science", "val/ppl/notes", "val/loss/notes"} <= columns
    assert not [c for c in columns if "dataloader_idx" in c]
    logged = [r for r in rows if r.get("val/ppl/notes")]
    assert len(logged) >= 2 and all(r["val/ppl"] and r["val/ppl/science"] for r in logged)  # steps 3 and 6


def test_the_report_has_one_row_per_domain_with_the_gap_recovered(domain_run):
    _, summary, run_dir = domain_run
    report = json.loads((run_dir / "report.json").read_text())
    domains = report["domains"]
    assert list(domains) == ["", "science", "notes"]
    assert domains[""]["perplexity"] == {s: row["perplexity"] for s, row in report["stages"].items()}
    assert domains["science"]["tokens"] == 60
    # float, qat and int4 are the run's own models: the same figures as summary.json's rows
    assert domains["science"]["perplexity"]["float"] == pytest.approx(summary["fp"]["ppl/science"], rel=1e-5)
    assert domains["notes"]["perplexity"]["qat"] == pytest.approx(summary["qat"]["ppl/notes"], rel=1e-5)
    assert domains["notes"]["perplexity"]["int4"] == pytest.approx(summary["int4"]["ppl/notes"], rel=1e-4)
    for row in domains.values():
        ppl = row["perplexity"]
        expected = gap_recovered(ppl["float"], ppl["ptq"], ppl["qat"]) if ppl["ptq"] > ppl["float"] else None
        assert row["gap_recovered"]["qat"] == expected
    markdown = (run_dir / "report.md").read_text()
    assert "## Perplexity by domain" in markdown
    table = markdown.split("## Perplexity by domain")[1].split("\n\n")[2].splitlines()
    assert table[0] == ("| domain | next tokens | float | PTQ | QAT | int4 file | QAT % gap recovered | "
                        "int4 file % gap recovered |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| training text (held-out end)", "| science", "| notes"]
    assert table[3].split(" | ")[1] == "60"
