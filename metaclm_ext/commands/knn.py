"""`metaclm knn RUN`: per-layer FAISS kNN over a run's training tokens (kNN accuracy, seed purity, kNN-LM)."""
from __future__ import annotations

import argparse

from . import out_folder
from ..knn import KINDS, METRICS, evaluate_run, format_report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="per-layer FAISS kNN over a run's training tokens: kNN accuracy, seed purity, kNN-LM")
    p.add_argument("run", help="run folder written by `metaclm train`")
    p.add_argument("--epoch", type=int, default=None, help="checkpoint epoch (default: the last)")
    p.add_argument("--k", type=int, default=16, help="neighbours per query (default 16)")
    p.add_argument("--metric", choices=METRICS, default="l2", help="l2 (kNN-LM, default) or ip (dual-form factor)")
    p.add_argument("--kind", choices=KINDS, default="flat", help="flat (exact, default) or ivfpq (large histories)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of neighbour weights")
    p.add_argument("--lambdas", default="0,0.1,0.25,0.5,0.75,0.9,1", help="kNN-LM interpolation weights")
    p.add_argument("--out", type=out_folder, default=None, help="output folder (default RUN/knn)")
    p.set_defaults(func=main)


def _lambdas(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--lambdas must be comma-separated numbers in [0, 1], got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    lambdas = _lambdas(args.lambdas)
    report = evaluate_run(args.run, epoch=args.epoch, k=args.k, metric=args.metric, kind=args.kind,
                          temperature=args.temperature, lambdas=lambdas, out_dir=args.out)
    print(format_report(report))
    return 0
