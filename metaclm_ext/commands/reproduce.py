"""`metaclm reproduce [--quick | --paper] --out DIR [--only STAGE,...]`, and the main() of the scripts in
scripts/ that run a few of its stages."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import out_folder
from ..boundary import run_guarded
from ..reproduce.run import reproduce
from ..reproduce.stages import STAGES


def _stage_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """--quick / --paper / --out / --no-progress, shared with the scripts in scripts/."""
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="minutes on 2 CPU cores: fewer epochs, checkpoints and samples (default)")
    scale.add_argument("--paper", dest="scale", action="store_const", const="paper",
                       help="the paper's settings (Tables 5 and 6, all checkpoints, 500 probe samples): 75 min on 2 CPU cores")
    p.set_defaults(scale="quick")
    p.add_argument("--out", type=out_folder, default=None, help="output folder (default reproduce-<scale>); a rerun into "
                   "the same folder skips the stages already done with the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # A JSON {stage: {setting: value}} over the scale's settings (tests; documented in docs/reproduce.md).
    p.add_argument("--settings", type=json.loads, default=None, help=argparse.SUPPRESS)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run everything (data, training, analyses, kNN, probing) and write REPORT.md "
                                         "with every table and figure beside the paper's")
    add_scale_arguments(p)
    p.add_argument("--only", type=_stage_list, default=None, metavar="STAGE,...",
                   help="run only these stages and the stages they need: " + ", ".join(s.name for s in STAGES))
    p.set_defaults(func=main)


def run_from_args(args: argparse.Namespace, only=None) -> int:
    """Run reproduce() for parsed arguments: 0 when every selected stage is done, 1 otherwise."""
    out = args.out or Path(f"reproduce-{args.scale}")
    result = reproduce(out, args.scale, only=only, settings=args.settings, progress=not args.no_progress)
    return 1 if result["failed"] else 0


def main(args: argparse.Namespace) -> int:
    return run_from_args(args, args.only)


def script_main(doc: str, stages: list[str], argv=None) -> int:
    """main() of a scripts/ wrapper: `--quick | --paper`, `--out`, then reproduce(only=stages); errors exit as
`metaclm` ones do (metaclm_ext.boundary)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(parser.prog, lambda: run_from_args(args, stages))
