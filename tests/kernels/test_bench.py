"""The benchmark runs end to end on a tiny shape and writes its table, keeping hand-written notes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qat.kernels import bench, bench_summary
from qat.kernels.native import native_module


def test_bench_writes_table_and_keeps_notes(tmp_path, capsys):
    output = tmp_path / "kernels-cpu.md"
    output.write_text(f"old table\n{bench.NOTES_MARKER}\nhand-written analysis\n")
    bench.main(["--shapes", "64x128", "--rows", "1,3", "--rounds", "1", "--reps", "2", "--group-size", "32",
                "--dtypes", "float32", "--output", str(output), "--threads", str(torch.get_num_threads())])
    printed = capsys.readouterr().out
    for method in ("| dense |", "| torch int4 op |", "| auto (dispatch) |", "| dequant_cached |", "| reference |"):
        assert method in printed
    text = output.read_text()
    assert "old table" not in text and text.count("| 64x128 | float32 |") == printed.count("| 64x128 | float32 |")
    assert "Machine: " in text and "Command: `python -m qat.kernels.bench" in text
    assert text.endswith(f"{bench.NOTES_MARKER}\nhand-written analysis\n")


def test_summary_table_has_every_dtype_and_m(tmp_path, capsys):
    output = tmp_path / "allM.md"
    bench.main(["--summary", "--shapes", "64x128", "--rows", "1,3,70", "--rounds", "1", "--reps", "2",
                "--group-size", "32", "--no-memory", "--output", str(output),
                "--threads", str(torch.get_num_threads())])
    text = output.read_text()
    assert "Machine: " in text and "Command: `python -m qat.kernels.bench" in text
    rows = [line for line in text.splitlines() if line.startswith(("| float32 |", "| bfloat16 |"))]
    assert [tuple(line.split(" | ")[:2]) for line in rows] == [
        (f"| {dtype}", m) for dtype in ("float32", "bfloat16") for m in ("1", "3", "70")]
    header = next(line for line in text.splitlines() if line.startswith("| x | M |")).split(" | ")
    picks = {line.split(" | ")[header.index("auto picks")] for line in rows}
    assert picks <= {"cpu_int4pack", "cpu_blocked", "cpu_blocked_bf16", "cpu_small_m", "cpu_int8_act",
                         "cpu_gemv_f32", "static rule"}, picks
    small_m = {line.split(" | ")[header.index("small_m")] for line in rows if line.split(" | ")[1] == "70"}
    assert small_m == {"n/a"}  # 70 rows: above dispatch's range for the small-M kernel, not timed
    # timed for every dtype where its kernel was compiled in (AVX-512 VNNI), "n/a" on every row elsewhere (AVX2)
    native = native_module()
    int8_cells = {line.split(" | ")[header.index("int8_act")] for line in rows}
    if native is not None and native.int8_act_available():
        assert all(cell.endswith("x") for cell in int8_cells), int8_cells
    else:
        assert int8_cells == {"n/a"}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_growth_sees_the_dense_copy_a_call_makes():
    """`dequant` dequantizes the whole 1024x1024 fp32 weight per call (4 MiB): the child must see that.

    The bound is 3 MiB, not 4: the allocator may place the copy partly on pages that are already resident
    (CI once measured 4 MiB less 3 pages). The packed kernel makes no dense copy: it grows by under 1 MiB.
    """
    growth, forms = bench_summary.peak_rss_growth(1024, 1024, 32, torch.float32, "dequant", [1], threads=1)
    assert growth >= 3 * 2**20 and forms == 0
    packed, _ = bench_summary.peak_rss_growth(1024, 1024, 32, torch.float32, "cpu_int4pack", [1], threads=1)
    assert packed < 2**20


def test_tensor_bytes_counts_every_tensor_of_a_form():
    from qat.kernels.int8_act import vnni_form
    from qat.kernels.weights import PackedInt4Weight

    from tests.kernels.helpers import make_layer

    weight = PackedInt4Weight(*make_layer(40, 256, 64), 64)  # 40 rows: 3 panels of 16
    expected = 3 * 32 * 64 + 3 * 4 * 16 * (2 + 1)  # codes (P, K / 8, 64) + fp16 scales and uint8 zeros (P, G, 16)
    assert bench_summary._tensor_bytes([vnni_form(weight)]) == expected
    assert bench_summary._tensor_bytes((torch.zeros(3), [torch.zeros(2, dtype=torch.int8)])) == 14


def test_bench_prints_only_and_writes_its_record_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    options = ["--shapes", "64x128", "--rows", "1,3", "--rounds", "1", "--reps", "1", "--group-size", "32",
               "--dtypes", "float32", "--only", "reference", "--threads", str(torch.get_num_threads())]
    bench.main(options)
    printed = capsys.readouterr().out
    assert {line.split(" | ")[2] for line in printed.splitlines() if line.startswith("| 64x128")} == {"1", "3"}
    assert "wrote" not in printed and not (tmp_path / "benchmarks").exists()
    bench.main([*options, "--write"])
    record = tmp_path / bench.TABLE_PATH.format(device="cuda" if torch.cuda.is_available() else "cpu")
    assert f"wrote {record.relative_to(tmp_path)}" in capsys.readouterr().out and record.is_file()
