"""Joining the process group that ``torchrun`` describes in the environment."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "init_from_torchrun", "local_device", "run_on_ranks"]

T = TypeVar("T")

# How long a collective waits for a rank that hangs before every other rank fails.
DEFAULT_TIMEOUT_S = 600


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device means this rank's GPU (LOCAL_RANK); other devices as they are."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_from_torchrun(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join torchrun's process group (NCCL for a CUDA device, else gloo) when it started several
    processes (WORLD_SIZE > 1); False, and nothing done, otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def run_on_ranks(device: torch.device, compute: Callable[[bool], T]) -> tuple[T, bool]:
    """``compute(shows_progress)`` on every rank that torchrun started, inside its process group, or in this
    process alone; returns (result, writes): ``writes`` is True on the one process that should write the
    outputs (rank 0, or the lone process), so that N ranks write what one process writes."""
    if not init_from_torchrun(device):
        return compute(True), True
    try:
        rank = dist.get_rank()
        return compute(rank == 0), rank == 0
    finally:
        dist.destroy_process_group()
