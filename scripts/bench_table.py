#!/usr/bin/env python
"""Benchmark table: our three ops vs chunked torch and FAISS on the paper's shapes.

For each workload (history_topk, history_label_mass, dual_form_apply) it prints our time, each
baseline's time, the ratio to the best baseline, and the fraction of this machine's limit,
max(bytes read / memory read bandwidth, flops / sgemm rate). Both rates are measured in the same run,
before every workload, and the highest is used. Flops are the op's essential work: for the linear ops
O(N D), not the O(N Q D) of scoring every row. Saves JSON (with the machine's description) and a plot
of time against N under benchmarks/results/.

    python scripts/bench_table.py                 # the default grid (18 minutes on 2 cores)
    python scripts/bench_table.py --quick         # small sizes, a few minutes
    python scripts/bench_table.py --only history_label_mass   # one op's workloads
    python scripts/bench_table.py --store-rows 50000000 --store-only   # 50M rows streamed from a store on disk
    python scripts/bench_table.py --analysis-only    # per-checkpoint limits, the shape of `metaclm analyze`
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from matplotlib.figure import Figure

import metaclm_ext
from metaclm_ext import HistoryStore, HistoryWriter, baselines
from metaclm_ext.reproduce.provenance import cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))
K = 10
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def machine() -> dict:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "python": platform.python_version()}


BASELINE_BUDGET_S = 20.0  # a baseline stops repeating past this (its run-to-run spread is far below 5x)
NUM_LABELS = 280  # label classes for history_label_mass (as in benchmarks/bench_ops.py)


def workloads(quick: bool) -> list[dict]:
    """The paper's shapes: attention histories (H = 8 heads of Dh = 8) and FFN histories (D = 128)."""
    if quick:
        sizes, big = [100_000, 400_000], 400_000
    else:
        sizes, big = [1_000_000, 4_000_000, 16_000_000], 4_000_000
    attn = dict(op="history_topk", kind="attn", queries=200, heads=8, head_dim=8, dtype="float16")
    ffn = dict(op="history_topk", kind="ffn", queries=200, heads=1, head_dim=128, dtype="float16")
    grid = [dict(attn, rows=n) for n in sizes]
    grid.append(dict(attn, rows=big, dtype="float32"))
    grid.append(dict(attn, rows=sizes[0], queries=3600))
    grid += [dict(ffn, rows=n) for n in sizes[:2]]
    grid.append(dict(ffn, rows=big, dtype="float32"))
    grid += [dict(attn, op="history_label_mass", rows=n) for n in sizes[:2]]
    grid += [dict(ffn, op="dual_form_apply", rows=n) for n in sizes[:2]]
    grid.append(dict(ffn, op="dual_form_apply", rows=big, dtype="float32"))
    return grid


def analysis_workloads(quick: bool) -> list[dict]:
    """history_topk as `metaclm analyze` calls it on the table5 paper run: the validation queries of 174
    checkpoints (200 each) together, each limited to the rows recorded up to its checkpoint (equal steps
    here), beside the same history with the 200 queries of the last checkpoint alone."""
    rows, checkpoints = (30_000, 30) if quick else (300_000, 174)
    attn = dict(op="history_topk", kind="attn-limits", rows=rows, heads=8, head_dim=8, dtype="float16")
    return [dict(attn, queries=200 * checkpoints, checkpoints=checkpoints), dict(attn, queries=200, checkpoints=1)]


def checkpoint_limits(rows: int, queries: int, checkpoints: int) -> torch.Tensor:
    """Per-query limits: `checkpoints` equal groups of queries, group g limited to (g + 1) / checkpoints of the rows."""
    per = queries // checkpoints
    return torch.arange(1, checkpoints + 1).mul(rows).div(checkpoints, rounding_mode="floor").repeat_interleave(per)


def write_store(path: str, rows: int, width: int, dtype: str, block: int = 1 << 20) -> None:
    """A HistoryStore of random rows, written block by block (memory stays at one block)."""
    gen = torch.Generator().manual_seed(0)
    with HistoryWriter.create(path, fields={"h": (width, dtype)}, columns={}, shard_rows=block) as w:
        for start in range(0, rows, block):
            w.append({"h": torch.randn(min(block, rows - start), width, generator=gen).to(DTYPES[dtype])})


def topk_work(rows: int, width: int, itemsize: int, queries: int) -> tuple[float, float]:
    """history_topk's bytes read and flops: every row once, one FMA per (row element, query)."""
    return rows * width * itemsize, 2.0 * rows * width * queries


def run_store(w: dict, path: str) -> dict:
    """history_topk streamed from a store on disk (first pass after writing: the page cache holds what fits)."""
    width = w["heads"] * w["head_dim"]
    if not os.path.exists(os.path.join(path, "manifest.json")):
        write_store(path, w["rows"], width, w["dtype"])
    store = HistoryStore(path)
    queries = torch.randn(w["queries"], w["heads"], w["head_dim"], generator=torch.Generator().manual_seed(1))
    out = dict(w, baselines={})
    out["ours_s"] = baselines.best_time(lambda: metaclm_ext.history_topk(queries, store["h"], K), 1)
    out["bytes"], out["flops"] = topk_work(w["rows"], width, DTYPES[w["dtype"]].itemsize, w["queries"])
    return out


def run(w: dict, max_baseline_rows: int) -> dict:
    """Times our op and its baselines on one workload; records the op's bytes and essential flops."""
    gen = torch.Generator().manual_seed(0)
    n, width, nq = w["rows"], w["heads"] * w["head_dim"], w["queries"]
    history = torch.randn(n, width, generator=gen).to(DTYPES[w["dtype"]])
    queries = torch.randn(nq, w["heads"], w["head_dim"], generator=gen)
    itemsize = history.element_size()
    if w["op"] == "history_topk" and "checkpoints" in w:  # per-query limits: only rows below them are work
        limit = checkpoint_limits(n, nq, w["checkpoints"])
        ours = lambda: metaclm_ext.history_topk(queries, history, K, limit=limit)  # noqa: E731
        candidates = {}
        nbytes, flops = n * width * itemsize, 2.0 * width * float(limit.sum())
    elif w["op"] == "history_topk":
        ours = lambda: metaclm_ext.history_topk(queries, history, K)  # noqa: E731
        candidates = {"torch": lambda: baselines.torch_topk(queries, history, K)}
        nbytes, flops = topk_work(n, width, itemsize, nq)
    elif w["op"] == "history_label_mass":
        labels = torch.randint(0, NUM_LABELS, (n,), generator=gen)
        ours = lambda: metaclm_ext.history_label_mass(queries, history, labels, NUM_LABELS)  # noqa: E731
        candidates = {"torch": lambda: baselines.torch_label_mass(queries, history, labels, NUM_LABELS),
                      "torch-linear": lambda: baselines.torch_label_mass_linear(queries, history, labels, NUM_LABELS)}
        # reads rows and labels; one add per element into the per-label sums, then the read-out
        nbytes, flops = n * (width * itemsize + 8), n * width + 2.0 * nq * NUM_LABELS * width
    else:  # dual_form_apply: errors as wide as the inputs (D_out = D_in = 128)
        inputs, errors, q2 = history, torch.randn(n, width, generator=gen).to(history.dtype), queries[:, 0]
        ours = lambda: metaclm_ext.dual_form_apply(q2, inputs, errors)  # noqa: E731
        candidates = {"torch": lambda: baselines.torch_dual_form(q2, inputs, errors),
                      "torch-linear": lambda: baselines.torch_dual_form_linear(q2, inputs, errors)}
        nbytes, flops = 2 * n * width * itemsize, 2.0 * n * width * width + 2.0 * nq * width * width
    # Best of 3 on this drifting VM, ours and baselines alike (the limit's rates are maxima too); a
    # baseline stops repeating once BASELINE_BUDGET_S is spent.
    repeat = 3
    out = dict(w, baselines={})
    out["ours_s"] = baselines.best_time(ours, repeat)
    out["bytes"], out["flops"] = nbytes, flops
    if n <= max_baseline_rows:
        for name, fn in candidates.items():
            out["baselines"][name] = baselines.best_time(fn, repeat, BASELINE_BUDGET_S)
        if w["op"] == "history_topk" and "checkpoints" not in w:
            indexes = baselines.faiss_indexes(history, w["heads"])
            out["baselines"]["faiss"] = baselines.best_time(lambda: baselines.faiss_topk(queries, indexes, K), repeat,
                                                            BASELINE_BUDGET_S)
            del indexes
    return out


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


COLUMNS = ("torch", "torch-linear", "faiss")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--max-baseline-rows", type=int, default=4_000_000,
                    help="skip the (slow) baselines above this many rows (default 4M)")
    ap.add_argument("--only", choices=["history_topk", "history_label_mass", "dual_form_apply"],
                    help="run the workloads of one op only")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "benchmarks", "results"))
    ap.add_argument("--store-rows", type=int, default=0,
                    help="also stream an attention history of this many rows from a HistoryStore on disk "
                         "(e.g. 50000000 = 6.4 GB fp16; written once under --store-dir)")
    ap.add_argument("--store-only", action="store_true",
                    help="run only the --store-rows workload (results in cpu-store.json)")
    ap.add_argument("--analysis-only", action="store_true",
                    help="run only history_topk with per-checkpoint limits, the shape of `metaclm analyze` "
                         "(results in cpu-analysis.json)")
    ap.add_argument("--store-dir", default=os.path.join(HERE, "..", "runs", "bench-store"),
                    help="where the benchmark store lives (default runs/bench-store, git-ignored)")
    args = ap.parse_args()

    info = machine()
    load_before = os.getloadavg()  # recorded: on shared cores the times depend on it
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}")
    # The rates are measured before every workload and the highest of the run is kept: the machine's
    # speed drifts (a shared VM), and the highest rate gives the strictest limit.
    read_gbps, gflops = 0.0, 0.0
    rows = []
    if args.analysis_only:
        grid = analysis_workloads(args.quick)
    else:
        grid = [] if args.store_only else [w for w in workloads(args.quick) if args.only in (None, w["op"])]
    if args.store_rows:
        grid.append(dict(op="history_topk", kind="attn-store", rows=args.store_rows, queries=200, heads=8, head_dim=8,
                         dtype="float16"))
    for i, w in enumerate(grid):
        read_gbps, gflops = max(read_gbps, baselines.memory_read_gbps()), max(gflops, baselines.sgemm_gflops())
        label = f"{w['kind']} N={w['rows']:,} Q={w['queries']} {w['dtype']}"
        if "checkpoints" in w:
            label += f" ({w['checkpoints']} limit{'s' if w['checkpoints'] > 1 else ''})"
        print(f"[{i + 1}/{len(grid)}] {w['op']} {label} ...", end=" ", flush=True)
        if w["kind"] == "attn-store":
            r = run_store(w, os.path.join(args.store_dir, f"attn-{w['rows']}"))
        else:
            r = run(w, args.max_baseline_rows)
        r["label"] = label
        print(f"ours {r['ours_s']:.3f} s, " + ", ".join(f"{k} {v:.3f} s" for k, v in r["baselines"].items()), flush=True)
        rows.append(r)
    read_gbps, gflops = max(read_gbps, baselines.memory_read_gbps()), max(gflops, baselines.sgemm_gflops())

    print(f"\nmeasured: memory read {read_gbps:.1f} GB/s, sgemm {gflops:.0f} GFLOP/s (the highest of the run)")
    print("history_topk: top and last k=10 in one pass; baselines do both (torch: 2 topk; FAISS: 2 searches).")
    print("torch = by scores (O(N Q D)); torch-linear = by linearity (O(N D)), as our label mass and dual form.\n")
    header = (f"{'op':<18} {'workload':<34} {'ours s':>8} " + " ".join(f"{c + ' s':>15}" for c in COLUMNS)
              + f" {'best/ours':>9} {'limit s':>8} {'ours/limit':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        base = r["baselines"]
        r["limit_s"] = baselines.floor_seconds(r["bytes"], r["flops"], read_gbps, gflops)
        r["speedup_vs_best_baseline"] = min(base.values()) / r["ours_s"] if base else None
        r["fraction_of_limit"] = r["limit_s"] / r["ours_s"]
        print(f"{r['op']:<18} {r['label']:<34} {r['ours_s']:>8.3f} " + " ".join(f"{fmt(base.get(c)):>15}" for c in COLUMNS)
              + f" {fmt(r['speedup_vs_best_baseline'], '.1f'):>9} {r['limit_s']:>8.3f} {r['ours_s'] / r['limit_s']:>9.2f}x")

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = ("cpu-analysis" if args.analysis_only else "cpu-store" if args.store_only else
            "cpu-quick" if args.quick else "cpu")
    result = {"machine": info, "memory_read_gbps": read_gbps, "sgemm_gflops": gflops, "k": K,
              "when": stamp, "load_average": {"before": load_before[0], "after": os.getloadavg()[0]}, "results": rows}
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {os.path.relpath(path)}")
    if not (args.store_only or args.analysis_only) and any(r["op"] == "history_topk" for r in rows):
        plot(rows, os.path.join(args.out, f"{name}-time-vs-n.png"), info)
    return 0


def plot(rows: list[dict], path: str, info: dict) -> None:
    series = [r for r in rows
              if r["op"] == "history_topk" and r["kind"] == "attn" and r["queries"] == 200 and r["dtype"] == "float16"]
    fig = Figure(figsize=(6, 4))  # no pyplot: nothing to display, no global figure state
    ax = fig.subplots()
    n = [r["rows"] for r in series]
    times = [dict(r["baselines"], ours=r["ours_s"], limit=r["limit_s"]) for r in series]
    for key, label, style in [("ours", "metaclm_ext.history_topk", "o-"), ("torch", "torch chunked matmul+topk", "s--"),
                              ("faiss", "FAISS IndexFlatIP (2 searches)", "^--"), ("limit", "machine limit", ":")]:
        pts = [(x, t[key]) for x, t in zip(n, times) if key in t]
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
