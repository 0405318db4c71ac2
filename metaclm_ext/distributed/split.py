"""Splitting a store's rows across ranks at shard boundaries."""
from __future__ import annotations

from bisect import bisect_left

from ..store import HistoryStore

__all__ = ["split_store"]


def split_store(store: HistoryStore, world_size: int) -> list[tuple[int, int]]:
    """Row ranges (start, stop), one per rank in rank order, that tile the store and start and end on
    shard boundaries (so no two ranks read, or verify, the same shard file), each as near N/world_size
    rows as the boundaries allow. With fewer shards than ranks some ranges are empty."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    bounds, n = store.shard_starts, len(store)
    cuts = [0]
    for r in range(1, world_size):
        target = r * n / world_size
        i = bisect_left(bounds, target)
        nearest = min(bounds[max(0, i - 1) : i + 1], key=lambda b: (abs(b - target), b))
        cuts.append(max(cuts[-1], nearest))
    cuts.append(n)
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]
