"""`metaclm attribute RUN TEXT`: the fine-tuning tokens each recorded layer retrieves for each position of TEXT."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..attribution import attribute, write_outputs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="top-k / last-k fine-tuning tokens per layer for each position of a text "
                                         "(Markdown, JSON, HTML page)")
    p.add_argument("run", type=Path, help="RUN folder of `metaclm finetune` (finetune.json, history/, checkpoints/)")
    p.add_argument("text", help="the text to attribute (at most the model's context)")
    p.add_argument("--position", type=int, default=None, help="attribute only this token position (default: all)")
    p.add_argument("--k", type=int, default=10, help="top-k and last-k rows per layer and module (default 10)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="recorded layers to query (default: all)")
    p.add_argument("--checkpoint", type=int, default=None,
                   help="the checkpoint's step (default: the final model); queries see the rows recorded before it")
    p.add_argument("--per-head", action="store_true",
                   help="rank the attention rows per head (heads x head_dim) instead of over the whole width")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/attribution)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = attribute(args.run, args.text, position=args.position, k=args.k, layers=args.layers,
                       checkpoint=args.checkpoint, per_head=args.per_head, progress=not args.no_progress)
    paths = write_outputs(result, args.out or args.run / "attribution")
    print(f"attributed {len(result['positions'])} position(s) x {len(result['modules'])} modules against "
          f"{result['checkpoint']['rows']:,} rows (checkpoint step {result['checkpoint']['step']}) in "
          f"{result['seconds']:.1f} s")
    print("wrote " + ", ".join(paths.values()))
    return 0
