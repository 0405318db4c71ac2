"""`metaclm train`: the paper's GPT-2 design model on the synthetic language; every TrainConfig field is a flag."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import out_folder
from ..dtypes import HISTORY_DTYPE_NAMES
from ..training import PRESETS, TrainConfig, make_config
from ..training.loop import resume, train

_FLAG_TYPES = {"int": int, "Optional[int]": int, "float": float, "Optional[float]": float, "str": str}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the paper's GPT-2 design model (presets table5, table6, tiny)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="table5")
    p.add_argument("--out", type=out_folder, default=None, help="RUN_DIR to create")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (no other flags)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder from `metaclm data` (default: generate)")
    p.add_argument("--record-history", nargs="?", const="", default=None, metavar="DIR",
                   help="record the training history into a store at DIR (default RUN_DIR/history)")
    p.add_argument("--record-errors", action="store_true", help="also record the c_proj error signals e_t")
    p.add_argument("--history-dtype", choices=sorted(HISTORY_DTYPE_NAMES), default=None, help="store dtype (default float16)")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("record_history", "record_errors", "history_dtype"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=_FLAG_TYPES[f.type], default=None,
                       help=f"override {f.name} ({f.type})")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    if args.record_history is not None:
        # The default store lives in the run folder and is recorded relative to it; a folder given by
        # hand is taken relative to where the command runs, and recorded as an absolute path.
        overrides["record_history"] = str(Path(args.record_history).resolve()) if args.record_history else "history"
    overrides["record_errors"] = args.record_errors or None
    if args.resume is not None:
        given = sorted(k for k, v in overrides.items() if v is not None)
        if args.out is not None or args.data is not None or given:
            raise ValueError(f"--resume continues a run with its own configuration: drop --out, --data and "
                             f"{', '.join('--' + g.replace('_', '-') for g in given) or 'the other flags'}")
        resume(args.resume, progress=not args.no_progress)
        return 0
    if args.out is None:
        raise ValueError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    cfg = make_config(args.preset, **overrides)
    train(cfg, args.out, data_dir=args.data, progress=not args.no_progress)
    return 0
