"""The process group under the distributed operators: its description in errors, and collectives that
fail with a clear error instead of hanging.

A collective waits for every rank of the group. A rank that died (or hangs) leaves the others waiting
until the group's timeout (``torch.distributed.init_process_group(timeout=...)``) or until the backend
notices the closed connection; either way the backend raises, and :func:`collective` turns that into a
:class:`DistributedHistoryError` that names the group and the step of the exchange.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistributedHistoryError", "collective", "describe_group", "exchange_device", "rank_and_size"]

T = TypeVar("T")


class DistributedHistoryError(RuntimeError):
    """A rank of the group failed, died or timed out during a distributed history operator."""


def rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(torchrun sets its environment) before a distributed history operator")
    return dist.get_rank(group), dist.get_world_size(group)


def describe_group(group: Optional[dist.ProcessGroup]) -> str:
    name = dist.group.WORLD.group_name if group is None else group.group_name
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    return f"process group {name!r} ({dist.get_backend(group)}, global ranks {ranks})"


def exchange_device(group: Optional[dist.ProcessGroup], device: torch.device) -> torch.device:
    """Where the states travel: NCCL moves CUDA tensors only; gloo takes CPU tensors."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def collective(what: str, group: Optional[dist.ProcessGroup], call: Callable[[], T]) -> T:
    """`call()` (a collective over `group`), its backend failure re-raised naming the group."""
    try:
        return call()
    except RuntimeError as exc:  # DistBackendError and gloo's timeouts/closed connections are RuntimeErrors
        raise DistributedHistoryError(
            f"{what} on {describe_group(group)} failed: a rank died, hung past the group's timeout or lost its "
            f"connection ({type(exc).__name__}: {exc})") from exc
