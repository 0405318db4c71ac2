"""Recording under DistributedDataParallel (DDP): what the recorder must know of the averaging.

DDP all-reduces the gradients during the backward and, when the backward ends, writes their mean over
the ranks into ``.grad`` (its reducer's end-of-backward callback). The update is then
``-lr * c * (1/world) * sum_r g_r``: each rank's recorded errors must carry the 1/world factor, and the
gradient scaling c (clipping) must be measured against the averaged gradient, not the rank's own, which
is what a post-accumulate-grad hook sees (it fires before DDP's hook marks the gradient ready). The
ranks' stores are read as one history, so each error field's store scale is chosen by all ranks alike,
from the largest value over the ranks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["after_backward", "averaged_over", "largest_over_ranks", "rank_group", "recorded_model"]


def averaged_over(model: torch.nn.Module) -> int:
    """How many ranks' gradients DDP averages into each gradient of `model` (1 without DDP)."""
    if isinstance(model, DistributedDataParallel):
        return dist.get_world_size(model.process_group)
    return 1


def rank_group(model: torch.nn.Module) -> Optional[dist.ProcessGroup]:
    """The process group DDP averages `model`'s gradients over (None without DDP)."""
    return model.process_group if isinstance(model, DistributedDataParallel) else None


def largest_over_ranks(values: list[float], group: dist.ProcessGroup, device: torch.device) -> list[float]:
    """The elementwise maximum of every rank's `values` (a collective: every rank of `group` calls it with
    as many values; `device` is where the backend exchanges tensors, CUDA for NCCL)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


def recorded_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose modules are recorded: the one DDP wraps (module names as without DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def after_backward(callback: Callable[[], None]) -> None:
    """Run `callback` when the current backward has ended, after DDP has written the averaged gradients.

    DDP queues its end-of-backward callback during the backward, so by the time the callbacks run it is
    queued already; a callback queued from a callback runs after every one queued before it.
    """
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(callback))
