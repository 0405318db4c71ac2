"""Every rank raises when one rank fails.

A rank that raised while the others go on would leave them waiting in the next collective until the
group's timeout, and report a timeout instead of the cause. So each phase of a distributed operator ends
with an exchange of every rank's outcome (its error or None): if any rank failed, every rank raises the
error of the first failing part of the history, the one a single process would have met first.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, TypeVar

import torch.distributed as dist

from .group import DistributedHistoryError, collective, rank_and_size

__all__ = ["Outcome", "attempt", "share_outcomes"]

T = TypeVar("T")

# Kinds re-raised as themselves on every rank, so that callers catch the same errors as around the
# single-process operators (bad input, NaN/Inf rows, a corrupt store: StoreError is a ValueError).
_REBUILT = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}


class Outcome(NamedTuple):
    value: object  # the phase's result on this rank, None if it failed
    error: Optional[Exception]


def attempt(call: Callable[[], T]) -> Outcome:
    """Run one rank's local work, keeping its error for the exchange instead of raising it at once."""
    try:
        return Outcome(call(), None)
    except Exception as exc:  # every kind: any of them would leave the other ranks waiting
        return Outcome(None, exc)


def share_outcomes(what: str, outcome: Outcome, group: Optional[dist.ProcessGroup],
                   order: Optional[list[int]] = None) -> list:
    """Every rank's outcome value (small, picklable), in rank order; raises on every rank if any failed.

    ``order`` lists the ranks in global row order (default: rank order): the first failing one in it is
    reported, and the rank that failed raises its own error chained.
    """
    rank, size = rank_and_size(group)
    error = outcome.error
    mine = (outcome.value, None if error is None else (type(error).__name__, str(error)))
    everyone: list = [None] * size
    collective(f"{what}: exchange of outcomes", group, lambda: dist.all_gather_object(everyone, mine, group=group))
    failed = [r for r in (order if order is not None else range(size)) if everyone[r][1] is not None]
    if failed:
        first = failed[0]
        kind, message = everyone[first][1]
        cls = _REBUILT.get(kind, DistributedHistoryError)
        text = f"{what} failed on rank {first} of {size}: {message}"
        raise cls(text if cls is not DistributedHistoryError else f"{text} ({kind})") from (
            error if rank == first else None)
    return [value for value, _ in everyone]
