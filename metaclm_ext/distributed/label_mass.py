"""history_label_mass over a history split across the ranks of a process group."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ..ops import NOT_DIFFERENTIABLE, limit_tensor, shape_of, check_label_mass_args, label_mass_state
from ..stream import History, RowSource
from .exchange import fingerprint, run_on_parts
from .merge import sum_in_order

__all__ = ["history_label_mass"]


@NOT_DIFFERENTIABLE
def history_label_mass(
    queries: torch.Tensor,
    history: History,
    labels: Union[torch.Tensor, RowSource],
    num_labels: int,
    *,
    row_offset: Optional[int] = None,
    limit: Union[int, torch.Tensor, None] = None,
    heads: Optional[int] = None,
    chunk_rows: Optional[int] = None,
    dst: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> Optional[torch.Tensor]:
    """:func:`metaclm_ext.history_label_mass` of the whole history, each rank holding a part of its rows
    (``history`` and ``labels`` rows of this rank; the other arguments as in
    :func:`metaclm_ext.distributed.history_topk`).

    Each rank's mass [Q, H, L] (fp64) of its rows below each query's limit travels, and the parts are
    summed in fp64 in global row order, so every rank and every run gets the same answer: docs/distributed.md
    says when it equals the single-process call bitwise and how close it is otherwise.
    """
    def describe():
        rows, width = shape_of("history", history, allow_empty=True)
        q = check_label_mass_args(queries, history, labels, num_labels, heads)
        return rows, fingerprint(q, limit, num_labels, width), q

    def compute(q, total, offset):
        lim = limit_tensor(limit, q.shape[0], total, q.device)
        return (label_mass_state(q, history, labels, num_labels, lim, chunk_rows, offset),)

    def merge(states):
        return sum_in_order([s[0] for s in states]).to(torch.float32)

    answer = run_on_parts("distributed history_label_mass", row_offset, group, dst, describe, compute, merge)
    return None if answer is None else answer.to(queries.device)
