#!/usr/bin/env python
"""history_topk over every recorded input field of a real fine-tuning store, against this machine's limit.

Q queries per field (attention inputs as heads x head_dim from the store's recording attrs, FFN inputs as
one head of full width), with per-checkpoint limits (query q sees the rows before fine-tuned checkpoint q mod C, so
the last checkpoint's queries read the whole field), one pass per field, streamed from the store on disk
(each pass reads and checksums the field anew; the first pass of a field is reported beside the best of
--repeat: what the page cache holds from earlier reads is not controlled, and the JSON gives the store's
size beside the machine's memory, and the load average, since other processes share the CPUs).
The limit of a pass is max(bytes read / memory read bandwidth, flops / sgemm rate) as in
scripts/bench_table.py, with both rates measured before and after the passes and the highest kept;
flops are one multiply-add per (query, candidate row, dimension).

    python scripts/bench_real_store.py RUN                # RUN of `metaclm finetune` (or a store folder)
    python scripts/bench_real_store.py RUN --queries 200 --fields 'mlp_in.*'

Writes benchmarks/results/real-store.json (or --out).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench_table import machine
from metaclm_ext import HistoryStore, baselines, history_topk
from metaclm_ext.attribution import AttributionRun

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "benchmarks" / "results" / "real-store.json"
DEFAULT_FIELDS = ("attn_in.*", "mlp_in.*")


def open_history(path: Path) -> tuple[HistoryStore, list[int]]:
    """(store, row limits of the fine-tuned checkpoints) of a run folder, or of a bare store (one limit: all
    rows). The pretrained start has no rows before it, so it has no queries."""
    if (path / "finetune.json").is_file():
        run = AttributionRun(path)
        return run.store, [c.rows for c in run.checkpoints if c.rows]
    store = HistoryStore(path)
    return store, [len(store)]


def field_heads(store: HistoryStore) -> dict[str, int]:
    """Input field -> heads its queries are split into (the recorded attention heads; FFN: 1)."""
    modules = store.attrs.get("recording", {}).get("modules", [])
    return {m["input_field"]: m["heads"] or 1 for m in modules if m.get("input_field")}


def bench_field(store: HistoryStore, field: str, heads: int, limits: torch.Tensor, k: int, repeat: int,
                seed: int) -> dict:
    """``repeat`` passes of history_topk over ``field``, each streamed from the store anew: the first pass
    (``seconds``) and the best (``best_seconds``, which the page cache and warm thread pools favour)."""
    width, dtype = store.fields[field]
    queries = torch.randn(len(limits), heads, width // heads, generator=torch.Generator().manual_seed(seed))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        history_topk(queries, store[field], k, limit=limits)
        times.append(time.perf_counter() - start)
    stop = int(limits.max())
    nbytes = stop * width * store[field].dtype.itemsize
    return {"field": field, "width": width, "heads": heads, "head_dim": width // heads, "dtype": dtype,
            "rows_read": stop, "bytes": nbytes, "flops": 2.0 * width * float(limits.sum()), "seconds": times[0],
            "best_seconds": min(times), "gbps": nbytes / times[0] / 1e9, "best_gbps": nbytes / min(times) / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="RUN folder of `metaclm finetune` (its history/ is used) or a store folder")
    ap.add_argument("--queries", type=int, default=200, help="queries per field (default 200)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--fields", nargs="+", default=list(DEFAULT_FIELDS),
                    help="fnmatch patterns of the fields to query (default: every input field)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per field: the first and the best are reported")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    store, checkpoint_rows = open_history(args.path)
    fields = [f for f in store.fields if any(fnmatch.fnmatchcase(f, p) for p in args.fields)]
    if not fields:
        ap.error(f"no field of {store.path} matches {args.fields} (it has {sorted(store.fields)})")
    if args.queries <= 0 or args.repeat <= 0:
        ap.error(f"--queries and --repeat must be positive, got {args.queries} and {args.repeat}")
    limits = torch.tensor([checkpoint_rows[q % len(checkpoint_rows)] for q in range(args.queries)])
    heads = field_heads(store)
    info = machine()
    read_gbps, gflops = baselines.memory_read_gbps(), baselines.sgemm_gflops()
    print(f"machine: {info['cpu']}, {info['threads']} threads; store {store.path}: {len(store):,} rows, "
          f"{store.nbytes / 1e9:.2f} GB, checkpoint limits {checkpoint_rows}")
    results = []
    for i, field in enumerate(fields):
        r = bench_field(store, field, heads.get(field, 1), limits, args.k, args.repeat, seed=i)
        print(f"[{i + 1}/{len(fields)}] {field}: [{r['rows_read']:,} x {r['heads']} x {r['head_dim']}] {r['dtype']}, "
              f"{r['bytes'] / 1e6:,.0f} MB: first pass {r['seconds']:.3f} s = {r['gbps']:.2f} GB/s, best "
              f"{r['best_seconds']:.3f} s", flush=True)
        results.append(r)
    read_gbps, gflops = max(read_gbps, baselines.memory_read_gbps()), max(gflops, baselines.sgemm_gflops())
    for r in results:
        r["limit_s"] = baselines.floor_seconds(r["bytes"], r["flops"], read_gbps, gflops)
        r["ratio_to_limit"] = r["seconds"] / r["limit_s"]
        r["best_ratio_to_limit"] = r["best_seconds"] / r["limit_s"]
    total = {key: sum(r[key] for r in results) for key in ("bytes", "flops", "seconds", "best_seconds", "limit_s")}
    total["gbps"] = total["bytes"] / total["seconds"] / 1e9
    total["best_gbps"] = total["bytes"] / total["best_seconds"] / 1e9
    total["ratio_to_limit"] = total["seconds"] / total["limit_s"]
    total["best_ratio_to_limit"] = total["best_seconds"] / total["limit_s"]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    result = {"machine": info, "memory_read_gbps": read_gbps, "sgemm_gflops": gflops, "store": str(store.path),
              "store_rows": len(store), "store_bytes": store.nbytes, "machine_memory_bytes": memory,
              "load_average": os.getloadavg(), "queries": args.queries, "k": args.k, "repeat": args.repeat,
              "checkpoint_rows": checkpoint_rows, "fields": results,
              "total": total, "when": time.strftime("%Y%m%d-%H%M%S")}
    print(f"\nmeasured: memory read {read_gbps:.1f} GB/s, sgemm {gflops:.0f} GFLOP/s (the highest of the run)")
    print(f"all {len(results)} fields, {total['bytes'] / 1e9:.2f} GB: first passes {total['seconds']:.2f} s = "
          f"{total['gbps']:.2f} GB/s ({total['ratio_to_limit']:.2f}x the limit of {total['limit_s']:.2f} s); best passes "
          f"{total['best_seconds']:.2f} s = {total['best_gbps']:.2f} GB/s ({total['best_ratio_to_limit']:.2f}x); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
