"""What this machine gives a second process: 1 vs 2 processes of one thread each on pure compute.

    python scripts/core_scaling.py

The ceiling for any strong-scaling measurement of 1 vs 2 processes here (scripts/bench_distributed.py):
a Python integer loop (no memory traffic) and a 512 x 512 fp32 matmul loop (torch, one thread), each run
in one process, then in two at once; the throughput ratio is 2 x (one process's time) / (the slower of two).
"""
import multiprocessing as mp
import os
import time

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, in this process and in each worker

import torch  # noqa: E402


def integer_loop(_) -> float:
    began, total = time.perf_counter(), 0
    for i in range(30_000_000):
        total += i
    return time.perf_counter() - began


def matmul_loop(_) -> float:
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    began = time.perf_counter()
    for _ in range(400):
        a @ a
    return time.perf_counter() - began


if __name__ == "__main__":
    for work in (integer_loop, matmul_loop):
        one = work(0)
        with mp.get_context("spawn").Pool(2) as pool:
            two = pool.map(work, [0, 1])
        print(f"{work.__name__}: 1 process {one:.2f} s; 2 processes {two[0]:.2f} / {two[1]:.2f} s -> "
              f"throughput x{2 * one / max(two):.2f}")
