"""The `metaclm` command line. Thin: each subcommand parses its flags and calls one library function.

Each subcommand is one module of metaclm_ext.commands with ``add_parser(subparsers)`` and ``main(args)``.
"""
from __future__ import annotations

import argparse
import sys

from .commands import (analyze, data, demo, dualcheck, finetune, finetune_analyze, knn, probe, reproduce, store_info,
                       train)

# In the order `metaclm --help` lists them.
COMMANDS = (demo, data, train, dualcheck, analyze, knn, store_info, probe, reproduce, finetune, finetune_analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaclm",
        description="Transformers as inner optimisation over their training history (arXiv 2310.05884).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"metaclm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
