"""The plots' data choices: sparse reliability bins merged, categories in the report's worst-first order."""

from __future__ import annotations

import pytest

from qat.eval.plots import _worst_first, merge_sparse_bins


def bins(*cells: tuple[int, float, float]) -> list[dict]:
    width = 1 / len(cells)
    return [{"lo": i * width, "hi": (i + 1) * width, "count": n, "confidence": c, "accuracy": a}
            for i, (n, c, a) in enumerate(cells)]


def test_sparse_bins_merge_into_their_neighbours_with_weighted_values():
    merged = merge_sparse_bins(bins((1, 0.3, 1.0), (3, 0.4, 0.0), (20, 0.6, 0.5), (0, 0.7, 0.0), (40, 0.9, 0.9),
                                    (2, 0.99, 1.0)), min_count=10)
    assert [b["count"] for b in merged] == [24, 42]  # 1 + 3 + 20; 40 + the 2 at the end; the empty bin dropped
    assert merged[0]["confidence"] == pytest.approx((0.3 + 3 * 0.4 + 20 * 0.6) / 24)
    assert merged[0]["accuracy"] == pytest.approx((1.0 + 20 * 0.5) / 24)
    assert (merged[0]["lo"], merged[-1]["hi"]) == (0.0, 1.0)
    assert merged[1]["accuracy"] == pytest.approx((40 * 0.9 + 2 * 1.0) / 42)


def test_dense_bins_stay_as_they_are_and_one_sparse_bin_stays_alone():
    dense = bins((10, 0.2, 0.1), (30, 0.5, 0.5))
    assert merge_sparse_bins(dense, min_count=10) == dense
    assert [b["count"] for b in merge_sparse_bins(bins((3, 0.5, 1.0)), min_count=10)] == [3]


def test_plots_list_categories_worst_first_as_the_report_tables_do():
    rows = {"ptq": [{"layer": "a"}, {"layer": "b"}, {"layer": "c"}],
            "int4": [{"layer": "c"}, {"layer": "a"}]}  # the report's tables: worst first
    assert _worst_first(rows, "layer") == (["c", "a", "b"], "int4")
    assert _worst_first({"qat": [{"slice": "3"}, {"slice": "1"}]}, "slice") == (["3", "1"], "qat")
