"""The `metaclm` subcommands, one module each: ``add_parser(subparsers)`` declares its flags and ``main(args)``
turns them into one library call and prints the result. The library modules know nothing of argparse."""
from __future__ import annotations

import argparse
from pathlib import Path


def out_folder(text: str) -> Path:
    """argparse type of an output folder: refused when it, or a folder on its way, is an existing file."""
    path = Path(text)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder")
            break
    return path
