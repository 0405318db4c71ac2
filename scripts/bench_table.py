#!/usr/bin/env python
"""Benchmark table for issue 9: our kernels vs chunked torch and FAISS on the paper's shapes.

For each workload it prints our time, each baseline's time, the ratio to the best baseline, and the
fraction of this machine's limit, max(bytes read / memory read bandwidth, flops / sgemm rate), with
both rates measured at the start of the same run. Saves JSON (with the machine's description) and a
plot of time against N under benchmarks/results/.

    python scripts/bench_table.py                 # the default grid (about 10 minutes on 2 cores)
    python scripts/bench_table.py --quick         # small sizes, a minute
    python scripts/bench_table.py --store-rows 50000000 --store-only   # 50M rows streamed from a store on disk
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import baselines  # noqa: E402

import metaclm_ext  # noqa: E402

K = 10
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def machine() -> dict:
    from metaclm_ext.reproduce.provenance import cpu_model

    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "python": platform.python_version()}


def workloads(quick: bool) -> list[dict]:
    if quick:
        sizes, big = [100_000, 400_000], 400_000
    else:
        sizes, big = [1_000_000, 4_000_000, 16_000_000], 4_000_000
    grid = []
    for n in sizes:
        grid.append(dict(kind="attn", rows=n, queries=200, heads=8, head_dim=8, dtype="float16"))
    grid.append(dict(kind="attn", rows=big, queries=200, heads=8, head_dim=8, dtype="float32"))
    grid.append(dict(kind="attn", rows=sizes[0], queries=3600, heads=8, head_dim=8, dtype="float16"))
    for n in sizes[:2]:
        grid.append(dict(kind="ffn", rows=n, queries=200, heads=1, head_dim=128, dtype="float16"))
    return grid


def write_store(path: str, rows: int, width: int, dtype: str, block: int = 1 << 20) -> None:
    """A HistoryStore of random rows, written block by block (memory stays at one block)."""
    from metaclm_ext import HistoryWriter

    gen = torch.Generator().manual_seed(0)
    with HistoryWriter.create(path, fields={"h": (width, dtype)}, columns={}, shard_rows=block) as w:
        for start in range(0, rows, block):
            w.append({"h": torch.randn(min(block, rows - start), width, generator=gen).to(DTYPES[dtype])})


def run_store(w: dict, path: str, read_gbps: float, gflops: float) -> dict:
    """history_topk streamed from a store on disk (first pass after writing: the page cache holds what fits)."""
    from metaclm_ext import HistoryStore

    width = w["heads"] * w["head_dim"]
    if not os.path.exists(os.path.join(path, "manifest.json")):
        write_store(path, w["rows"], width, w["dtype"])
    store = HistoryStore(path)
    queries = torch.randn(w["queries"], w["heads"], w["head_dim"], generator=torch.Generator().manual_seed(1))
    out = dict(w, torch_s=None, faiss_s=None)
    out["ours_s"] = baselines.best_time(lambda: metaclm_ext.history_topk(queries, store["h"], K), 1)
    out["limit_s"] = baselines.limit_seconds(w["rows"], width, DTYPES[w["dtype"]].itemsize, w["queries"], read_gbps, gflops)
    return out


def run(w: dict, read_gbps: float, gflops: float, max_baseline_rows: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    width = w["heads"] * w["head_dim"]
    history = torch.randn(w["rows"], width, generator=gen).to(DTYPES[w["dtype"]])
    queries = torch.randn(w["queries"], w["heads"], w["head_dim"], generator=gen)
    repeat = 3 if w["rows"] <= 1_000_000 else 1
    out = dict(w)
    out["ours_s"] = baselines.best_time(lambda: metaclm_ext.history_topk(queries, history, K), repeat)
    out["limit_s"] = baselines.limit_seconds(w["rows"], width, history.element_size(), w["queries"], read_gbps, gflops)
    out["torch_s"] = out["faiss_s"] = None
    if w["rows"] <= max_baseline_rows:
        out["torch_s"] = baselines.best_time(lambda: baselines.torch_topk(queries, history, K), repeat)
        indexes = baselines.faiss_indexes(history, w["heads"])
        out["faiss_s"] = baselines.best_time(lambda: baselines.faiss_topk(queries, indexes, K), repeat)
        del indexes
    return out


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    ap.add_argument("--max-baseline-rows", type=int, default=4_000_000,
                    help="skip the (slow) baselines above this many rows (default 4M)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "benchmarks", "results"))
    ap.add_argument("--store-rows", type=int, default=0,
                    help="also stream an attention history of this many rows from a HistoryStore on disk "
                         "(e.g. 50000000 = 6.4 GB fp16; written once under --store-dir)")
    ap.add_argument("--store-only", action="store_true",
                    help="run only the --store-rows workload (results in cpu-store.json)")
    ap.add_argument("--store-dir", default=os.path.join(HERE, "..", "runs", "bench-store"),
                    help="where the benchmark store lives (default runs/bench-store, git-ignored)")
    args = ap.parse_args()

    read_gbps, gflops = baselines.memory_read_gbps(), baselines.sgemm_gflops()
    info = machine()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    print(f"measured: memory read {read_gbps:.1f} GB/s, sgemm {gflops:.0f} GFLOP/s (same run)")
    print("history_topk, top and last k=10 in one pass; baselines do both (torch: 2 topk; FAISS: 2 searches)\n")
    header = f"{'workload':<40} {'ours s':>8} {'torch s':>8} {'faiss s':>8} {'best/ours':>9} {'limit s':>8} {'ours/limit':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    grid = [] if args.store_only else workloads(args.quick)
    if args.store_rows:
        grid.append(dict(kind="attn-store", rows=args.store_rows, queries=200, heads=8, head_dim=8, dtype="float16"))
    for w in grid:
        if w["kind"] == "attn-store":
            r = run_store(w, os.path.join(args.store_dir, f"attn-{w['rows']}"), read_gbps, gflops)
        else:
            r = run(w, read_gbps, gflops, args.max_baseline_rows)
        base = [t for t in (r["torch_s"], r["faiss_s"]) if t is not None]
        r["speedup_vs_best_baseline"] = min(base) / r["ours_s"] if base else None
        r["fraction_of_limit"] = r["limit_s"] / r["ours_s"]
        label = f"{w['kind']} N={w['rows']:,} Q={w['queries']} {w['dtype']}"
        print(f"{label:<40} {r['ours_s']:>8.3f} {fmt(r['torch_s'], '.3f'):>8} {fmt(r['faiss_s'], '.3f'):>8} "
              f"{fmt(r['speedup_vs_best_baseline'], '.1f'):>9} {r['limit_s']:>8.3f} {r['ours_s'] / r['limit_s']:>9.2f}x",
              flush=True)
        rows.append(r)

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "cpu-store" if args.store_only else ("cpu-quick" if args.quick else "cpu")
    result = {"machine": info, "memory_read_gbps": read_gbps, "sgemm_gflops": gflops, "k": K,
              "when": stamp, "results": rows}
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {os.path.relpath(path)}")
    if not args.store_only:
        plot(rows, os.path.join(args.out, f"{name}-time-vs-n.png"), info)
    return 0


def plot(rows: list[dict], path: str, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [r for r in rows if r["kind"] == "attn" and r["queries"] == 200 and r["dtype"] == "float16"]
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["rows"] for r in series]
    for key, label, style in [("ours_s", "metaclm_ext.history_topk", "o-"), ("torch_s", "torch chunked matmul+topk", "s--"),
                              ("faiss_s", "FAISS IndexFlatIP (2 searches)", "^--"), ("limit_s", "machine limit", ":")]:
        pts = [(x, r[key]) for x, r in zip(n, series) if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("history rows N")
    ax.set_ylabel("seconds (top-10 and last-10)")
    ax.set_title(f"attention history, H=8 x Dh=8 fp16, Q=200\n{info['cpu']}, {info['threads']} threads", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    sys.exit(main())
