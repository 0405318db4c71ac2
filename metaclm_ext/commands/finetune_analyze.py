"""`metaclm finetune-analyze RUN`: which fine-tuning tokens each recorded layer attends to, for held-out sentences.

Under ``torchrun --nproc-per-node N`` the history stream is split across the ranks (gloo: each reads its
shards of the store); every rank gets the whole history's answer and rank 0 writes it (docs/distributed.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..distributed.launch import run_on_ranks
from ..finetune.report import layer_rows, write_outputs
from ..finetune.same_article import AnalysisConfig, same_article_analysis

DEFAULTS = AnalysisConfig()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune-analyze", help="same-article share of the attended fine-tuning tokens per layer "
                                                "(Figure 3 on a `metaclm finetune` run)")
    p.add_argument("run", type=Path, help="RUN folder of `metaclm finetune`")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/same-article)")
    p.add_argument("--k", type=int, default=DEFAULTS.k, help=f"top-k / last-k attended rows (default {DEFAULTS.k})")
    p.add_argument("--max-queries", type=int, default=DEFAULTS.max_queries,
                   help=f"held-out positions queried per checkpoint (default {DEFAULTS.max_queries})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = AnalysisConfig(args.k, args.max_queries, args.seed)
    result, writes = run_on_ranks(torch.device("cpu"), lambda shows: same_article_analysis(
        args.run, cfg, progress=shows and not args.no_progress))
    if not writes:
        return 0
    out = args.out or args.run / "same-article"
    files = write_outputs(result, out)
    chance = result["chance"]["article"][-1]
    print(f"{result['queries_per_checkpoint']} held-out queries x {len(result['checkpoints'])} checkpoints against "
          f"{result['history_rows']:,} history rows in {result['seconds']['total']:.0f} s")
    print(f"same {result['label']} at step {result['checkpoints'][-1]} (chance {chance:.1f}%):")
    for r in layer_rows(result):
        print(f"  layer {r[0]:>2}: MHSA top {r[1]}% last {r[2]}%, FFN top {r[3]}% last {r[4]}%")
    print(f"wrote {', '.join(sorted(files.values()))} to {out}")
    return 0

