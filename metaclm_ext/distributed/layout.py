"""Which global rows each rank holds: the parts must tile the history [0, N) without gaps or overlaps."""
from __future__ import annotations

from typing import NamedTuple, Optional

__all__ = ["Layout", "plan_layout"]


class Layout(NamedTuple):
    offsets: list[int]  # per rank: its first global row
    rows: list[int]  # per rank: how many rows it holds
    total: int  # N, the rows of the whole history
    order: list[int]  # the ranks in global row order (ranks holding no rows where their offset puts them)


def plan_layout(rows: list[int], offsets: list[Optional[int]]) -> Layout:
    """The layout from every rank's row count and offset (all None: the parts follow in rank order).

    Every rank computes it from the same exchanged numbers, so a bad layout raises the same ValueError
    on every rank.
    """
    if all(o is None for o in offsets):
        offsets, start = [], 0
        for n in rows:
            offsets.append(start)
            start += n
    elif any(o is None for o in offsets):
        missing = [r for r, o in enumerate(offsets) if o is None]
        raise ValueError(f"row_offset must be given on every rank or on none; ranks {missing} gave None")
    for r, o in enumerate(offsets):
        if isinstance(o, bool) or not isinstance(o, int) or o < 0:
            raise ValueError(f"row_offset of rank {r} must be an int >= 0, got {o!r}")
    order = sorted(range(len(rows)), key=lambda r: (offsets[r], rows[r]))
    total = sum(rows)
    expected = 0
    for r in order:
        if rows[r] and offsets[r] != expected:
            what = "overlaps the rows before it" if offsets[r] < expected else f"leaves rows {expected}..{offsets[r] - 1} to no rank"
            raise ValueError(f"rank {r}'s rows [{offsets[r]}, {offsets[r] + rows[r]}) {what}: the ranks' parts must "
                             f"tile the history [0, {total}) (row offsets {offsets}, rows {rows})")
        if not rows[r] and offsets[r] > total:
            raise ValueError(f"rank {r} holds no rows at row_offset {offsets[r]}, past the history's N = {total}")
        expected += rows[r]
    return Layout(offsets, rows, total, order)
