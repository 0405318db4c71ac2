"""history_topk over a history split across the ranks of a process group."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ..ops import NOT_DIFFERENTIABLE, HistoryTopK, as_heads, limit_tensor, shape_of, check_k, finalize_topk, topk_state
from ..stream import History
from .exchange import fingerprint, run_on_parts
from .merge import merge_heaps

__all__ = ["history_topk"]


@NOT_DIFFERENTIABLE
def history_topk(
    queries: torch.Tensor,
    history: History,
    k: int = 10,
    *,
    row_offset: Optional[int] = None,
    limit: Union[int, torch.Tensor, None] = None,
    heads: Optional[int] = None,
    chunk_rows: Optional[int] = None,
    dst: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> Optional[HistoryTopK]:
    """:func:`metaclm_ext.history_topk` of the whole history, each rank holding a part of its rows.

    ``history`` is this rank's part (a tensor or a row source, possibly of 0 rows), whose row t is
    global row ``row_offset + t`` (row_offset None on every rank: the parts follow in rank order). Every
    rank passes the same queries, k, limit and heads; ``limit`` counts global rows. The answer (the same
    indices and values as the single-process call on the whole history, ties to the lower global row)
    comes back on every rank, or with ``dst`` on that rank only (None elsewhere). Ranks exchange only
    their [Q, H, k] heaps.
    """
    def describe():
        rows, width = shape_of("history", history, allow_empty=True)
        q = as_heads(queries, width, heads, {"history": history})
        return rows, fingerprint(q, limit, k, width), q

    def compute(q, total, offset):
        check_k(k, total)
        lim = limit_tensor(limit, q.shape[0], total, q.device)
        return topk_state(q, history, k, lim, chunk_rows, offset)

    def merge(states):
        top = merge_heaps([s[0] for s in states], [s[1] for s in states], k)
        last = merge_heaps([s[2] for s in states], [s[3] for s in states], k)
        return finalize_topk((*top, *last))

    answer = run_on_parts("distributed history_topk", row_offset, group, dst, describe, compute, merge)
    if answer is None:
        return None
    device = queries.device
    return HistoryTopK(*(type(sel)(sel.values.to(device), sel.indices.to(device)) for sel in answer))
