"""`metaclm data`: sample the synthetic regex language (Appendix D) into a folder and print Table 2."""
from __future__ import annotations

import argparse

from . import out_folder
from ..data import SETTINGS, VOCAB, generate, table2, write


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="sample the synthetic regex language (Appendix D) and print Table 2")
    p.add_argument("--out", type=out_folder, required=True, help="output folder (train.jsonl, validation.jsonl, meta.json)")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="small", help="10 seeds (small) or 50 (large)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed: same seed, same bytes (default 0)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    data = generate(args.setting, args.seed)
    write(data, args.out)
    s = data["meta"]["stats"]
    print(f"wrote {args.out}: {s['train']['sequences']} train / {s['validation']['sequences']} validation "
          f"sequences, {data['meta']['num_seeds']} seeds, {s['train']['min_letters']}-{s['train']['max_letters']} "
          f"letters, vocabulary {len(VOCAB)}")
    for i, regex in enumerate(data["meta"]["seeds"][:3]):
        print(f"  seed {i}: {regex}")
    print(table2(data))
    return 0
