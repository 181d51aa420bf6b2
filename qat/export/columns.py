"""Aligned text columns under a header line: the tables `qat inspect` prints (qat files and ONNX files).

Example:
    >>> print("\\n".join(table(["layer", "bits"], [["fc1", 4], ["classifier.1", 2]])))
      layer         bits
      fc1              4
      classifier.1     2
"""

from __future__ import annotations

from typing import Sequence


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    """Aligned text columns under a header line (cells as str; numbers right-aligned)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    numeric = [bool(cells) and all(_is_number(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: Sequence[str]) -> str:
        return indent + "  ".join(cell.rjust(width) if right else cell.ljust(width)
                                  for cell, width, right in zip(row, widths, numeric, strict=True)).rstrip()

    return [line(list(columns)), *(line(row) for row in cells)]


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).isdigit()
