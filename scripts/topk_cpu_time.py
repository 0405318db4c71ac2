#!/usr/bin/env python
"""CPU seconds of history_topk at the shape of `metaclm analyze`, for comparing builds on a shared machine.

Wall time on a machine whose cores are busy with other work measures the other work; the process's CPU
time (user + system, best of --repeats) measures ours. Two workloads on one random fp16 history of
--rows rows x 8 heads of 8: --checkpoints x 200 queries, each checkpoint's queries limited to its share of
the rows (the analysis' per-checkpoint limits), and 200 queries with one limit. The checksums let two
builds' answers be compared.

    python scripts/topk_cpu_time.py --threads 2 --rows 300000 --checkpoints 174
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

import metaclm_ext
from bench_table import checkpoint_limits


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints a line per workload and returns them as dicts (queries, limits, cpu_s, wall_s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--checkpoints", type=int, default=174)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    if min(args.threads, args.rows, args.checkpoints, args.repeats, args.k) < 1:
        ap.error("--threads, --rows, --checkpoints, --repeats and --k must be positive")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(args.rows, 64, generator=gen).half()
    results = []
    for checkpoints in (args.checkpoints, 1):
        nq = 200 * checkpoints
        queries = torch.randn(nq, 8, 8, generator=gen)
        limit = checkpoint_limits(args.rows, nq, checkpoints)
        best_cpu = best_wall = float("inf")
        for _ in range(args.repeats):
            cpu, wall = cpu_seconds(), time.perf_counter()
            out = metaclm_ext.history_topk(queries, history, args.k, limit=limit)
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, cpu_seconds() - cpu)
        gflop = 2.0 * 64 * float(limit.sum()) / 1e9
        print(f"Q = {nq:,} ({checkpoints} limit{'s' if checkpoints > 1 else ''}), {args.threads} threads: "
              f"CPU {best_cpu:.3f} s, wall {best_wall:.3f} s, {gflop / best_cpu:.1f} Gflop per CPU second; "
              f"checksum {int(out.top.indices.sum())} {int(out.last.indices.sum())}")
        results.append({"queries": nq, "limits": checkpoints, "cpu_s": best_cpu, "wall_s": best_wall})
    return results


if __name__ == "__main__":
    main()
