"""`metaclm demo`: history_topk on a random history, to see the kernel work and how fast it is."""
from __future__ import annotations

import time

import torch

from .dtypes import HISTORY_DTYPE_NAMES
from .ops import history_topk


def run_demo(rows: int, queries: int, heads: int, head_dim: int, k: int, dtype: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    history = torch.randn(rows, heads * head_dim, generator=gen).to(HISTORY_DTYPE_NAMES[dtype])
    q = torch.randn(queries, heads, head_dim, generator=gen)
    start = time.perf_counter()
    result = history_topk(q, history, k)
    seconds = time.perf_counter() - start
    return {"result": result, "seconds": seconds, "bytes": history.numel() * history.element_size()}
