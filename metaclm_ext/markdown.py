"""Markdown tables as every report writes them: ``| a | b |`` lines under a ``|---|---|`` rule."""
from __future__ import annotations

from typing import Iterable, Sequence


def _line(cells: Iterable) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence, rows: Iterable[Iterable]) -> list[str]:
    """The lines of a Markdown table: ``header``, the rule, then one line per row; cells go through ``str``."""
    return [_line(header), "|" + "---|" * len(header), *(_line(r) for r in rows)]
