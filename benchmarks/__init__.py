"""Recorded benchmarks, one package per area (README.md is the index).

Each script `x.py` writes or prints its record with the machine and the exact command (record.py);
its committed results are `x.md` / `x.json` beside it.
"""
