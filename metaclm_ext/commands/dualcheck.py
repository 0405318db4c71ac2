"""`metaclm dualcheck RUN`: rebuild every c_proj output from the recorded training history and compare."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..dualcheck import dualcheck, format_report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dualcheck", help="rebuild c_proj outputs from the training history (dual form) and compare")
    p.add_argument("run", type=Path, help="RUN_DIR of `metaclm train --record-history --record-errors`")
    p.add_argument("--epoch", type=int, default=None, help="checkpoint to check (default: the last)")
    p.add_argument("--history", type=Path, default=None, help="store folder (default: the run's)")
    p.add_argument("--max-sequences", type=int, default=None, help="use the first N validation sequences")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    report = dualcheck(args.run, args.epoch, args.history, args.max_sequences, progress=not args.no_progress)
    print(format_report(report))
    return 1 if report["passed"] is False else 0
