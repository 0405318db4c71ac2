"""`metaclm dualcheck RUN`: rebuild every recorded layer's output change from the training history and compare.

RUN is a `metaclm train` run folder, a `metaclm finetune` run folder, or a HistoryRecorder store folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..dualcheck import dualcheck, format_report
from ..finetune import is_finetune_run
from ..finetune.exactness import TOLERANCE as FINETUNE_TOLERANCE
from ..finetune.exactness import check_run
from ..recording import dualcheck_store
from ..recording import format_report as format_store_report
from ..recording.verify import DEFAULT_MAX_QUERIES
from ..store._format import MANIFEST


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dualcheck", help="rebuild recorded layers' outputs from the training history (dual form) "
                                         "and compare")
    p.add_argument("run", type=Path, help="RUN_DIR of `metaclm train --record-history --record-errors` or of "
                                          "`metaclm finetune`, or a HistoryRecorder store folder")
    p.add_argument("--epoch", type=int, default=None, help="`metaclm train` runs: checkpoint to check (default: the last)")
    p.add_argument("--history", type=Path, default=None, help="`metaclm train` runs: store folder (default: the run's)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="`metaclm train` runs: use the first N validation sequences")
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES,
                   help=f"finetune runs and stores: recorded inputs used as queries per module (default {DEFAULT_MAX_QUERIES})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    recorded = is_finetune_run(args.run) or (args.run / MANIFEST).exists()
    if not recorded:
        report = dualcheck(args.run, args.epoch, args.history, args.max_sequences, progress=not args.no_progress)
        print(format_report(report))
        return 1 if report["passed"] is False else 0
    given = [flag for flag, value in (("--epoch", args.epoch), ("--history", args.history),
                                      ("--max-sequences", args.max_sequences)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to `metaclm train` runs, not to {args.run}")
    if is_finetune_run(args.run):
        reports = list(check_run(args.run, args.max_queries, FINETUNE_TOLERANCE).values())
    else:
        reports = [dualcheck_store(args.run, max_queries=args.max_queries)]
    print("\n\n".join(format_store_report(r) for r in reports))
    return 1 if any(r["passed"] is False for r in reports) else 0
