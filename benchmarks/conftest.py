import os

import pytest
import torch

# Benchmarks run at a smoke size by default (CI runs them so they cannot rot); set
# METACLM_BENCH_ROWS for real sizes, or use scripts/bench_table.py for the full table.
ROWS = int(os.environ.get("METACLM_BENCH_ROWS", "20000"))


@pytest.fixture(scope="session")
def rows():
    return ROWS


@pytest.fixture(scope="session")
def attn_data(rows):
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(rows, 64, generator=gen).half()
    queries = torch.randn(200, 8, 8, generator=gen)
    return queries, history


@pytest.fixture(scope="session")
def ffn_data(rows):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(rows, 128, generator=gen).half()
    errors = torch.randn(rows, 128, generator=gen).half()
    queries = torch.randn(200, 128, generator=gen)
    return queries, inputs, errors
