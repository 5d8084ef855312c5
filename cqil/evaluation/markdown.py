"""Markdown pieces the report's sections share: a right-aligned table and a number or a dash."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, its first column left-aligned and the numbers right-aligned, then a blank line."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(align) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]


def num(value, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals with thousands separators; a dash when it is missing."""
    return "–" if value is None else f"{value:,.{digits}f}"
