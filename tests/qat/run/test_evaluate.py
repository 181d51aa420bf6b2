"""`qat eval` on a run directory, a checkpoint and an int4 file; the default recipe's run ends with
the report; bad inputs give errors naming the problem. One short training run shared by the module."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from qat.cli import DEFAULT_RECIPE, main
from qat.eval.outputs import EvalError
from qat.run.eval_sources import resolve
from qat.run.train import train
from tests.qat.run.helpers import FAST, ROOT, fast_recipe

pytestmark = pytest.mark.slow
PLOTS = ("layers.png", "reliability.png", "slices.png", "robustness.png", "size.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The default recipe, shrunk: 30 steps, warm-up 10, its report (with a bit budget) at the end; wandb
    offline, as the recipe has it."""
    base = tmp_path_factory.mktemp("eval_run")
    recipe = fast_recipe(base, "report.latency=false", "report.noise_levels=[0.0,0.3]", "logging.wandb=offline",
                         path=ROOT / DEFAULT_RECIPE)
    summary = train(recipe, quiet=True)
    yield summary, base / "digits_w2a4" / "version_0"
    import wandb

    wandb.finish()  # the run's wandb run stays open in this process; later tests start their own


def test_the_default_recipe_is_w2a4_with_the_report_on():
    from qat.recipe import load_recipe

    recipe = load_recipe(ROOT / DEFAULT_RECIPE)
    assert (recipe.quant.weight.bits, recipe.quant.activation.bits) == (2, 4)
    assert recipe.report.enabled and recipe.export.enabled


def test_the_run_ends_with_the_report_and_its_numbers_match_the_summary(run):
    summary, run_dir = run
    for name in ("report.md", "report.json", "float.safetensors", *PLOTS):
        assert (run_dir / name).stat().st_size > 0, name
    report = json.loads((run_dir / "report.json").read_text())
    assert summary["report"]["path"] == str(run_dir / "report.md")
    # the int4 stage is the exported file, loaded back: the same figure export_run measured
    assert report["stages"]["int4"]["accuracy"] == pytest.approx(summary["int4"]["acc"], abs=1e-6)
    assert report["stages"]["qat"]["accuracy"] == pytest.approx(summary["qat"]["acc"], abs=1e-6)
    logged = (run_dir / "metrics.csv").read_text().splitlines()
    assert "eval/ptq/kl" in logged[0]  # the report's figures also go to the run's loggers (CSV here)
    suggestion = report["sensitivity"]["suggestion"]
    assert suggestion["average_bits"] <= 2.5
    assert "quant.rules=[" in (run_dir / "report.md").read_text()


def test_the_runs_wandb_gets_the_reports_plots(run):
    _, run_dir = run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    images = {p.name.split("_")[0] for p in (offline / "files" / "media" / "images").rglob("*.png")}
    assert images == {name.removesuffix(".png") for name in PLOTS}
    assert list((offline / "files" / "media" / "table").rglob("stages*.table.json"))


@pytest.mark.parametrize("which", ["run_dir", "ckpt", "int4"])
def test_qat_eval_works_on_all_three_inputs(run, which, tmp_path, capsys):
    _, run_dir = run
    source = {"run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt",
              "int4": run_dir / "model.safetensors"}[which]
    skip = ["--no-sensitivity"] if which == "int4" else []
    code = main(["eval", str(source), "-o", str(tmp_path), "--no-latency", "--noise", "0", "0.2", *skip])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert ("sensitivity" in report) == (not skip)
    assert set(report["stages"]) == ({"float", "ptq", "int4"} if which == "int4" else {"float", "ptq", "qat", "int4"})
    assert report["stages"]["float"]["agreement"] == 1.0
    assert all((tmp_path / name).stat().st_size > 0 for name in PLOTS)
    printed = capsys.readouterr()
    assert "report:" in printed.out
    assert "qat eval: loading the models" in printed.err and "qat eval: comparing float, ptq" in printed.err


def test_qat_eval_of_the_run_reproduces_its_report_in_place(run, capsys):
    """No options: the recipe's `report` settings (budget_bits 2.5, noise levels, no latency), as at the end
    of training, so the run's report comes back digit for digit, its suggested bits included."""
    _, run_dir = run
    before = {name: (run_dir / name).read_text() for name in ("report.md", "report.json")}
    assert "Suggested bits under an average of 2.5 bits/weight" in before["report.md"]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # as a fresh `qat eval` process: the recipe's cpu_threads (1) must win
    try:
        assert main(["eval", str(run_dir)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert {name: (run_dir / name).read_text() for name in before} == before
    assert not (run_dir / "eval").exists()
    assert f"report: {run_dir / 'report.md'}" in capsys.readouterr().out


def test_qat_eval_with_other_settings_keeps_the_runs_report(run, capsys):
    _, run_dir = run
    before = {name: (run_dir / name).read_bytes() for name in ("report.md", "report.json", *PLOTS)}
    try:
        assert main(["eval", str(run_dir), "--budget-bits", "3"]) == 0
        assert {name: (run_dir / name).read_bytes() for name in before} == before  # the training report, kept
        other = json.loads((run_dir / "eval" / "report.json").read_text())
        assert 2.5 < other["sensitivity"]["suggestion"]["average_bits"] <= 3
        captured = capsys.readouterr()
        assert f"{run_dir / 'report.md'} has other figures and is kept" in captured.err
        assert f"report: {run_dir / 'eval' / 'report.md'}" in captured.out
    finally:
        shutil.rmtree(run_dir / "eval", ignore_errors=True)


def test_qat_eval_takes_its_defaults_from_the_recipes_report_settings():
    from qat.recipe import ReportConfig
    from qat.run.evaluate import report_options

    run_report = ReportConfig(enabled=True, noise_levels=[0.0, 0.3], latency=False, budget_bits=2.5)
    assert report_options(run_report) == {"noise_levels": [0.0, 0.3], "with_latency": False, "budget_bits": 2.5,
                                          "sensitivity": True}
    assert report_options(run_report, noise_levels=[0.1], with_latency=True, budget_bits=3.0, sensitivity=False) == \
        {"noise_levels": [0.1], "with_latency": True, "budget_bits": 3.0, "sensitivity": False}
    assert report_options(run_report, sensitivity=False)["budget_bits"] is None  # --no-sensitivity: no budget
    # No budget: the end-of-run report skips sensitivity, so qat eval does too; a run without one gets it.
    assert report_options(ReportConfig(enabled=True))["sensitivity"] is False
    assert report_options(ReportConfig(enabled=False))["sensitivity"] is True


def test_a_file_that_is_not_a_qat_checkpoint_is_named(tmp_path, capsys):
    garbage = tmp_path / "model.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["eval", str(garbage)]) == 2
    assert "is not a qat checkpoint" in capsys.readouterr().err
    plain = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    assert main(["eval", str(plain)]) == 2
    assert "is not a qat int4 checkpoint" in capsys.readouterr().err
    lightning_like = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, lightning_like)
    with pytest.raises(EvalError, match="is not a qat training checkpoint"):
        resolve(lightning_like)


def test_an_int4_file_without_a_float_reference_is_named(run, tmp_path):
    _, run_dir = run
    lonely = tmp_path / "model.safetensors"
    shutil.copy(run_dir / "model.safetensors", lonely)
    shutil.copy(run_dir / "recipe.yaml", tmp_path / "recipe.yaml")
    with pytest.raises(EvalError, match=r"no float reference for .*model.safetensors.*--float"):
        resolve(lonely)
    shutil.copy(run_dir / "float.safetensors", tmp_path / "float.safetensors")
    assert resolve(lonely).float_path == tmp_path / "float.safetensors"


def test_a_dataset_that_does_not_fit_the_model_is_named(run, capsys):
    _, run_dir = run
    code = main(["eval", str(run_dir), "--no-latency", "data._target_=qat.data.SyntheticTokensDataModule"])
    assert code == 2
    err = capsys.readouterr().err
    assert "the data does not fit the model (qat.models.DigitsCNN on qat.data.SyntheticTokensDataModule)" in err
    assert "input [128, 32]" in err


def test_fast_overrides_are_the_training_tests_ones():
    assert "schedule.warmup_steps=10" in FAST  # the run above reaches QAT and writes float.safetensors


def test_a_run_without_float_reference_ends_with_a_warning_not_a_crash(tmp_path, capsys):
    from types import SimpleNamespace

    from qat.recipe import load_recipe
    from qat.run.evaluate import report_run

    run = SimpleNamespace(recipe=load_recipe(ROOT / DEFAULT_RECIPE), run_dir=tmp_path, model=None, trainer=None)
    entry = report_run(run)
    assert entry == {"error": f"no evaluation report: no float reference {tmp_path / 'float.safetensors'}"}
    assert "qat: warning: no evaluation report" in capsys.readouterr().err


def test_a_tied_table_is_written_twice_and_loads_back_tied(tmp_path):
    """safetensors refuses two names on one tensor: the float reference copies the second name's table."""
    from qat.lightning.float_reference import separate_tied
    from qat.models import TinyLM

    model = TinyLM(tie_embeddings=True)
    state = separate_tied(model.state_dict())
    assert state["embed.weight"].data_ptr() != state["lm_head.weight"].data_ptr()
    assert torch.equal(state["embed.weight"], state["lm_head.weight"])
    safetensors.torch.save_file(state, str(tmp_path / "float.safetensors"))
    again = TinyLM(tie_embeddings=True)
    again.load_state_dict(safetensors.torch.load_file(str(tmp_path / "float.safetensors")))
    assert again.lm_head.weight is again.embed.weight and torch.equal(again.embed.weight, model.embed.weight)


def test_an_unwritable_report_folder_is_refused_before_the_evaluation(run, tmp_path, capsys):
    _, run_dir = run
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["eval", str(run_dir), "-o", str(blocker / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"qat eval: error: cannot write the report in {blocker / 'report'}: not a directory; "
                                "pass -o DIR for another folder"]
