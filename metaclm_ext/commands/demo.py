"""`metaclm demo`: history_topk on a random history, to see the kernel work and how fast it is."""
from __future__ import annotations

import argparse

import torch

from ..demo import check_demo, run_demo
from ..dtypes import HISTORY_DTYPE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="history_topk on a random history (prints a few results and the time)")
    p.add_argument("--rows", type=int, default=1_000_000, help="history rows N (default 1,000,000)")
    p.add_argument("--queries", type=int, default=200, help="queries Q (default 200)")
    p.add_argument("--heads", type=int, default=8, help="heads H (default 8)")
    p.add_argument("--head-dim", type=int, default=8, help="head dimension Dh (default 8)")
    p.add_argument("--k", type=int, default=10, help="rows kept per query head (default 10)")
    p.add_argument("--dtype", choices=sorted(HISTORY_DTYPE_NAMES), default="float16", help="history dtype (default float16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    check_demo(args.rows, args.queries, args.heads, args.head_dim, args.k)
    print(
        f"history_topk: random history N={args.rows:,} x D={args.heads * args.head_dim} ({args.dtype}), "
        f"Q={args.queries} queries, H={args.heads} heads of Dh={args.head_dim}, k={args.k}, "
        f"{torch.get_num_threads()} threads"
    )
    out = run_demo(args.rows, args.queries, args.heads, args.head_dim, args.k, args.dtype, args.seed)
    res = out["result"]
    for q in range(min(2, args.queries)):
        for h in range(min(2, args.heads)):
            top = ", ".join(f"{i}:{v:.3f}" for i, v in zip(res.top.indices[q, h, :3].tolist(), res.top.values[q, h, :3].tolist()))
            last = ", ".join(f"{i}:{v:.3f}" for i, v in zip(res.last.indices[q, h, :3].tolist(), res.last.values[q, h, :3].tolist()))
            print(f"  query {q} head {h}: top rows (row:score) {top} ... | last rows {last} ...")
    gb = out["bytes"] / 1e9
    print(f"time {out['seconds']:.3f} s for one pass over {gb:.3f} GB ({gb / out['seconds']:.2f} GB/s), "
          f"{args.rows * args.queries * args.heads / out['seconds'] / 1e9:.2f} G scores/s")
    return 0
