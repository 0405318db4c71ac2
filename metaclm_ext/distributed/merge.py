"""Exact merges of the ranks' small states, in global row order."""
from __future__ import annotations

import torch

from ..ops import sort_heap_entries

__all__ = ["merge_heaps", "sum_in_order"]


def merge_heaps(keys: list[torch.Tensor], indices: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries (keys descending, ties to the lower global row) of several [Q, H, k] heap
    states: exactly the heap one stream over all their rows would hold, since the best k of a union are
    among the best k of each part and the order is total (rows are distinct; padding rows sort last)."""
    merged_keys, merged_indices = sort_heap_entries(torch.cat(keys, dim=-1), torch.cat(indices, dim=-1))
    return merged_keys[..., :k].contiguous(), merged_indices[..., :k].contiguous()


def sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ... left to right (fp64 partial sums in row order): the same answer on
    every rank and on every run, where a reduction tree's order may vary."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total
