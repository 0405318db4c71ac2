"""`metaclm store-info PATH`: what a history store holds, and with --verify whether every shard is intact."""
from __future__ import annotations

import argparse

from ..store import HistoryStore
from ..store.scales import SCALES, field_scale, power_of_two


def describe(store: HistoryStore) -> list[str]:
    """Lines describing a store: rows, fields, columns, shards, size on disk, value scales, run attributes."""
    lines = [
        f"store      {store.path}",
        f"rows       {len(store):,}",
        f"shards     {store.num_shards} (up to {store.shard_rows:,} rows each)",
        f"size       {store.nbytes / 1e6:,.1f} MB on disk",
    ]
    lines += [f"field      {name}: [{len(store):,}, {width}] {dtype}" for name, (width, dtype) in store.fields.items()]
    lines += [f"column     {name}: [{len(store):,}] {dtype}" for name, dtype in store.columns.items()]
    attrs = store.attrs
    lines += [f"scale      {name}: {power_of_two(field_scale(attrs, name))} (stored = true value x scale)"
              for name in attrs.get(SCALES, {})]
    lines += [f"attr       {key} = {value!r}" for key, value in attrs.items() if key != SCALES]
    return lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store-info", help="describe a history store (rows, fields, columns, size); --verify checks checksums")
    p.add_argument("path", help="the store directory (the one holding manifest.json)")
    p.add_argument("--verify", action="store_true", help="read every shard and check its CRC-32 (progress bar)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    store = HistoryStore(args.path)
    print("\n".join(describe(store)))
    if args.verify:
        store.verify(progress=True)
        print(f"verified   all {store.num_shards * (len(store.fields) + len(store.columns))} shard files: checksums match")
    return 0
