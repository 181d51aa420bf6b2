"""The sweep's grid, Pareto front and plot (no training here; the recorded sweep is in benchmarks/)."""

from __future__ import annotations

import json

import pytest

import qat.run.sweep as sweep_module
from qat.eval.plots import size_plot
from qat.recipe import load_recipe
from qat.run.sweep import grid, pareto_front, table
from tests.qat.eval.toy_models import FRAGILE_RECIPE


def test_grid_is_the_product_with_overrides_that_load():
    settings = grid([2, 4], [32, 128], ["lsq", "lsq_plus"])
    assert [s["label"] for s in settings] == ["w2 g32 lsq", "w2 g32 lsq_plus", "w2 g128 lsq", "w2 g128 lsq_plus",
                                              "w4 g32 lsq", "w4 g32 lsq_plus", "w4 g128 lsq", "w4 g128 lsq_plus"]
    recipe = load_recipe(FRAGILE_RECIPE, settings[1]["overrides"])
    weight = recipe.quant.weight
    assert (weight.bits, weight.group_size, weight.quantizer, weight.symmetric) == (2, 32, "lsq_plus", False)


def test_an_unknown_method_is_named():
    with pytest.raises(ValueError, match=r"--method 'gptq' is not valid; allowed: lsq, observer, lsq_plus"):
        grid([4], [128], ["gptq"])


def test_pareto_front_by_hand():
    points = [{"bytes": 100, "acc": 0.90}, {"bytes": 200, "acc": 0.95}, {"bytes": 150, "acc": 0.89},
              {"bytes": 300, "acc": 0.95}, {"bytes": 400, "acc": 0.99}, {"bytes": 100, "acc": 0.90}]
    # 2 is beaten by 0 (smaller, better); 3 by 1 (smaller, equal); 5 duplicates 0 (neither beats the other)
    assert pareto_front(points, "acc", higher_is_better=True) == [0, 1, 4, 5]
    ppl = [{"bytes": 100, "ppl": 9.0}, {"bytes": 200, "ppl": 5.0}, {"bytes": 300, "ppl": 6.0}]
    assert pareto_front(ppl, "ppl", higher_is_better=False) == [0, 1]


def test_table_marks_the_front_and_the_plot_is_a_png(tmp_path):
    row = {"label": "w2 g128 lsq", "metric": "accuracy", "float": 0.99, "ptq": 0.9, "qat": 0.98, "int4": 0.98,
           "int4_agreement": 0.97, "ptq_kl": 0.2, "int4_kl": 0.01, "int4_ece": 0.02, "gap_recovered": 88.9,
           "file_bytes": 1000, "bytes": 600, "seconds": 5.0}
    rows = [row, {**row, "label": "w4 g128 lsq", "bytes": 900, "int4": 0.97}]
    text = table(rows, [0])
    assert "| w2 g128 lsq | 0.9900 | 0.9000 | 0.9800 | 0.9800 |" in text and text.count("| yes |") == 1
    points = [{"label": r["label"], "bytes": r["bytes"], "accuracy": r["int4"]} for r in rows]
    path = size_plot(points, "accuracy", tmp_path / "sweep.png", pareto=[0])
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


def test_the_sweep_prints_a_readable_line_per_setting_and_keeps_every_row(tmp_path, monkeypatch, capsys):
    def run_setting(recipe_path, setting, extra, runs_dir, resume):  # a stand-in for the training run
        size = 1000 * setting["bits"]
        return {**{k: v for k, v in setting.items() if k != "overrides"}, "metric": "accuracy", "float": 0.99,
                "ptq": 0.5 + setting["bits"] / 10, "qat": 0.97, "int4": 0.96, "int4_agreement": 0.95, "ptq_kl": 0.3,
                "int4_kl": 0.02, "int4_ece": 0.01, "gap_recovered": 90.0, "file_bytes": size + 234, "bytes": size,
                "bits_per_weight": 4.1, "seconds": 12.3, "run_dir": str(runs_dir / setting["label"])}

    monkeypatch.setattr(sweep_module, "run_setting", run_setting)
    stages = []
    rows = sweep_module.sweep("recipe.yaml", grid([2, 4], [128], ["lsq"]), tmp_path, progress=stages.append)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[1/2] w2 g128 lsq: int4 accuracy 0.9600 (float 0.9900, PTQ 0.7000, QAT 0.9700); 2,234 bytes "
                     "(2,000 at nominal bits); 12 s",
                     "[2/2] w4 g128 lsq: int4 accuracy 0.9600 (float 0.9900, PTQ 0.9000, QAT 0.9700); 4,234 bytes "
                     "(4,000 at nominal bits); 12 s"]
    assert stages[:2] == ["[1/2] training w2 g128 lsq", "[2/2] training w4 g128 lsq"]
    assert json.loads((tmp_path / "sweep-rows.json").read_text())["rows"] == rows
