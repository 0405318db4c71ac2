"""The `metaclm` command line. Thin: each subcommand parses its flags and calls one library function.

Subcommands live beside the code they drive; each module exposes ``add_parser(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order `metaclm --help` lists them.
COMMAND_MODULES = ["demo", "data", "train", "dualcheck", "analyze", "knn", "store_cli", "probe", "reproduce"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaclm",
        description="Transformers as inner optimisation over their training history (arXiv 2310.05884).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"metaclm_ext.{name}").add_parser(sub)
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
