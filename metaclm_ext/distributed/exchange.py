"""The skeleton of every distributed operator: describe, check, stream the local part, exchange states.

1. Each rank describes its part (rows, and a fingerprint of the arguments every rank must share); the
   descriptions (or the rank's error) are exchanged, the layout of the parts over [0, N) is planned.
2. Each rank folds its rows into the operator's merge state with the single-process streaming code,
   its rows numbered from its global offset; the outcomes (errors only) are exchanged.
3. The fixed-size states are gathered (to every rank, or to ``dst``) and merged in global row order.

Only the states travel, never rows; every phase ends in a collective that every rank reaches, so an
error on one rank is raised on all of them (see failures.py).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .failures import Outcome, attempt, share_outcomes
from .group import collective, exchange_device, rank_and_size
from .layout import plan_layout

__all__ = ["fingerprint", "gather_states", "run_on_parts"]


def fingerprint(*parts) -> str:
    """A digest of the arguments every rank must pass alike (queries, limit, k, widths)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(repr((part.dtype, tuple(part.shape))).encode())
            digest.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def gather_states(state: tuple, group: Optional[dist.ProcessGroup], dst: Optional[int],
                  what: str) -> Optional[list[tuple]]:
    """Every rank's state tuple, in rank order, on every rank (dst None) or on rank `dst` only."""
    rank, size = rank_and_size(group)
    device = exchange_device(group, state[0].device)
    mine = [t.to(device).contiguous() for t in state]
    received = []
    for t in mine:
        if dst is None:
            parts = [torch.empty_like(t) for _ in range(size)]
            collective(f"{what}: all_gather of states", group, lambda: dist.all_gather(parts, t, group=group))
        else:
            parts = [torch.empty_like(t) for _ in range(size)] if rank == dst else None
            collective(f"{what}: gather of states", group,
                       lambda: dist.gather(t, parts, group=group, group_dst=dst))
        received.append(parts)
    if dst is not None and rank != dst:
        return None
    return [tuple(parts[r] for parts in received) for r in range(size)]


def run_on_parts(what: str, row_offset: Optional[int], group: Optional[dist.ProcessGroup], dst: Optional[int],
                 describe: Callable[[], tuple], compute: Callable, merge: Callable[[list], object]):
    """Run a distributed operator; see the module docstring.

    describe() -> (local rows, fingerprint, context); compute(context, N, offset) -> state tuple of fixed
    shapes; merge(states in global row order) -> the answer. Returns the answer on every rank, or on
    rank `dst` only (None elsewhere).
    """
    rank, size = rank_and_size(group)

    def check_and_describe():
        if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < size):
            raise ValueError(f"dst must be None or a rank in [0, {size}), got {dst!r}")
        return describe()

    described = attempt(check_and_describe)  # errors here too are raised on every rank, after the exchange
    rows, digest, context = described.value if described.error is None else (0, None, None)
    shared = share_outcomes(f"{what} (arguments)", Outcome((rows, row_offset, (digest, dst)), described.error), group)
    if len({same for _, _, same in shared}) != 1:
        raise ValueError(f"{what}: the ranks were given different queries, limit, dst or parameters "
                         "(every rank must pass the same ones; only the history part differs)")
    layout = plan_layout([n for n, _, _ in shared], [o for _, o, _ in shared])
    if layout.total == 0:
        raise ValueError(f"{what}: the history is empty (0 rows on every rank)")
    computed = attempt(lambda: compute(context, layout.total, layout.offsets[rank]))
    share_outcomes(what, Outcome(None, computed.error), group, order=layout.order)
    states = gather_states(computed.value, group, dst, what)
    return None if states is None else merge([states[r] for r in layout.order])
