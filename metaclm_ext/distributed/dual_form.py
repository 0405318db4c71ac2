"""dual_form_apply over a history split across the ranks of a process group."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from ..ops import NOT_DIFFERENTIABLE, limit_tensor, check_dual_form_args, dual_form_state
from ..stream import History
from .exchange import fingerprint, run_on_parts
from .merge import sum_in_order

__all__ = ["dual_form_apply"]


@NOT_DIFFERENTIABLE
def dual_form_apply(
    queries: torch.Tensor,
    inputs: History,
    errors: History,
    *,
    row_offset: Optional[int] = None,
    limit: Union[int, torch.Tensor, None] = None,
    chunk_rows: Optional[int] = None,
    dst: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> Optional[torch.Tensor]:
    """:func:`metaclm_ext.dual_form_apply` of the whole history, each rank holding a part of its rows
    (``inputs`` and ``errors`` rows of this rank; the other arguments as in
    :func:`metaclm_ext.distributed.history_topk`).

    Each rank's outputs [Q, D_out] (fp64) of its rows below each query's limit travel, and the parts are
    summed in fp64 in global row order (see docs/distributed.md for when that is bitwise the
    single-process answer).
    """
    def describe():
        q = check_dual_form_args(queries, inputs, errors, allow_empty=True)
        return inputs.shape[0], fingerprint(q, limit, tuple(errors.shape[1:])), q

    def compute(q, total, offset):
        lim = limit_tensor(limit, q.shape[0], total, q.device)
        return (dual_form_state(q, inputs, errors, lim, chunk_rows, offset),)

    def merge(states):
        return sum_in_order([s[0] for s in states]).to(torch.float32)

    answer = run_on_parts("distributed dual_form_apply", row_offset, group, dst, describe, compute, merge)
    return None if answer is None else answer.to(queries.device)
