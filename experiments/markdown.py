"""GitHub-flavoured markdown tables for the generated reports.

A GFM table renders only when its separator row has exactly as many cells as its header row, and a cell
must not contain an unescaped ``|``. :func:`table` builds the separator from the header, escapes pipes and
refuses a row of the wrong width, so a report cannot ship a table that a markdown parser drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: column alignment -> separator cell (GFM: ``---`` left/default, ``---:`` right, ``:---:`` centre)
_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def cell(value: Any) -> str:
    """One table cell: text with ``|`` escaped and line breaks flattened."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """The lines of a GFM table.

    :param header: column titles.
    :param rows: one sequence of cells per row, each as long as ``header``.
    :param align: one letter per column, ``l``, ``r`` or ``c`` (default: first column left, the rest right).
    :raises ValueError: a row or ``align`` whose width differs from the header's, or an unknown alignment.
    """
    n = len(header)
    if n == 0:
        raise ValueError("a markdown table needs at least one column")
    align = align if align is not None else "l" + "r" * (n - 1)
    if len(align) != n or any(a not in _ALIGN for a in align):
        raise ValueError(f"table alignment {align!r}: need {n} letters from l, r, c")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"table row {i} has {len(row)} cells, the header {n}: {list(row)!r}")
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return lines
