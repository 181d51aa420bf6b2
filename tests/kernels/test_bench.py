"""The benchmark runs end to end on a tiny shape and writes its table, keeping hand-written notes."""

from __future__ import annotations

import torch
from qat.kernels import bench


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
