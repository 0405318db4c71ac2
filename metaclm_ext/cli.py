"""The `metaclm` command line. Thin: each subcommand parses its flags and calls one library function.

Each subcommand is one module of metaclm_ext.commands with ``add_parser(subparsers)`` and ``main(args)``.
Every failure ends as ``metaclm COMMAND: error: ...`` and exit 2 (bad input) or 1 (the machine), never a
traceback (metaclm_ext.boundary; ``METACLM_DEBUG=1`` shows it).
"""
from __future__ import annotations

import argparse
import sys

from .boundary import run_guarded
from .commands import (analyze, attribute, data, demo, dualcheck, finetune, finetune_analyze, knn, probe, reproduce,
                       store_info, train)

# In the order `metaclm --help` lists them.
COMMANDS = (demo, data, train, dualcheck, analyze, knn, store_info, probe, reproduce, finetune, finetune_analyze,
            attribute)


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
    return run_guarded(f"metaclm {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
