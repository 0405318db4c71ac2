"""`metaclm demo`: history_topk on a random history, to see the kernel work and how fast it is."""
from __future__ import annotations

import time

import torch

from .dtypes import HISTORY_DTYPE_NAMES
from .ops import history_topk


def check_demo(rows: int, queries: int, heads: int, head_dim: int, k: int) -> None:
    """ValueError naming the first size that is not a positive integer (before anything is printed or built)."""
    for name, value in (("rows", rows), ("queries", queries), ("heads", heads), ("head_dim", head_dim), ("k", k)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run_demo(rows: int, queries: int, heads: int, head_dim: int, k: int, dtype: str, seed: int) -> dict:
    check_demo(rows, queries, heads, head_dim, k)
    gen = torch.Generator().manual_seed(seed)
    history = torch.randn(rows, heads * head_dim, generator=gen).to(HISTORY_DTYPE_NAMES[dtype])
    q = torch.randn(queries, heads, head_dim, generator=gen)
    start = time.perf_counter()
    result = history_topk(q, history, k)
    seconds = time.perf_counter() - start
    return {"result": result, "seconds": seconds, "bytes": history.numel() * history.element_size()}
