"""The text tables every lab command prints (race, bench, chaos, doctor)."""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Sequence


def number(value: float | None) -> str:
    """A number as a table cell: ``-`` for none, else every significant digit."""
    return "-" if value is None else f"{value:.15g}"


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Collection[int] = (),
    widths: Sequence[int] | None = None,
    rule: bool = True,
    spaced: bool = False,
) -> str:
    """``rows`` under ``header``, columns two spaces apart; the columns in ``right`` are
    right-aligned. Columns fit their widest cell unless ``widths`` fixes them, and then a
    longer cell wraps onto more lines. ``rule`` draws dashes under the header; ``spaced``
    puts a blank line between rows."""
    if widths is None:
        widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def lines(row: Sequence[str]) -> list[str]:
        wrapped = [
            textwrap.wrap(cell, width) or [""] if len(cell) > width else [cell]
            for cell, width in zip(row, widths, strict=True)
        ]
        return [
            "  ".join(
                (cell[line] if line < len(cell) else "").rjust(width)
                if column in right
                else (cell[line] if line < len(cell) else "").ljust(width)
                for column, (cell, width) in enumerate(zip(wrapped, widths, strict=True))
            ).rstrip()
            for line in range(max(len(cell) for cell in wrapped))
        ]

    out = lines(header)
    if rule:
        out.append("  ".join("-" * width for width in widths))
    for index, row in enumerate(rows):
        if spaced and index:
            out.append("")
        out += lines(row)
    return "\n".join(out)
