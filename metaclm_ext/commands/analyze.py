"""`metaclm analyze RUN`: Figures 1, 2, 3, 6, 9, 10, 11 of the paper on a run of `metaclm train`.

Under ``torchrun --nproc-per-node N`` the attention's history stream is split across the ranks (each
reads its shards); every rank computes the same result and rank 0 writes it (docs/distributed.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import out_folder
from ..analyze.claims import tally
from ..analyze.report import write_outputs
from ..analyze.run import PARTS, AnalyzeConfig, analyze_run
from ..distributed.launch import local_device, run_on_ranks
from ..training import resolve_device


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 0,10,20, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="attention over the history, clustering, inner loss and norms over a run's "
                                       "checkpoints (Figures 1-3, 6, 9-11)")
    p.add_argument("run", type=Path, help="run folder written by `metaclm train` (--record-history for attention)")
    p.add_argument("--out", type=out_folder, default=None, help="output folder (default RUN/analysis)")
    p.add_argument("--epochs", type=_int_list, default=None,
                   help="comma-separated checkpoint epochs to analyse (default: every checkpoint)")
    p.add_argument("--every", type=int, default=1,
                   help="analyse every N-th of the chosen checkpoints, and the last (default 1: all)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    p.add_argument("--k", type=int, default=10, help="top-k / last-k attended history rows (default 10)")
    p.add_argument("--kmeans-init", type=int, default=4, help="KMeans restarts per fit (default 4)")
    p.add_argument("--seed", type=int, default=0, help="KMeans random state (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (forward passes; the kernels follow the queries)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    device = local_device(resolve_device(args.device))
    cfg = AnalyzeConfig(epochs=args.epochs, every=args.every, parts=parts, k=args.k, kmeans_init=args.kmeans_init,
                        seed=args.seed, device=str(device))
    result, writes = run_on_ranks(device, lambda shows: analyze_run(args.run, cfg,
                                                                    progress=shows and not args.no_progress))
    if not writes:
        return 0
    out = args.out or args.run / "analysis"
    files = write_outputs(result, out)
    for c in result["claims"]:
        print(f"{c['figure']:<11} {c['verdict']:<18} ({tally(c['checks'])})")
    print(f"wrote {', '.join(sorted(files.values()))} to {out} in {result['seconds']['total']:.1f} s")
    return 0
