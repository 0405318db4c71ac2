"""Strong scaling of the distributed history operators on this machine, and the cost of their merge.

    python scripts/bench_distributed.py [--rows 1000000] [--ranks 1 2] [--repeats 3] [--out DIR] [--json FILE]

Writes a store (fp16 history [N, 64], inputs [N, 64], errors [N, 64], int64 labels) into DIR (a fresh
temporary folder by default), then for each world size starts that many gloo processes of one thread
each on localhost; every rank streams its shard-aligned part (split_store, HistoryStore.rows) through
each operator (and again over its part read into memory: no reads or checksums, which run
on a read-ahead thread beside the rank's one compute thread), and the time of a call is the slowest rank's (after a barrier; the store's pages are
warm after a first untimed call). The merge is timed on its own with k rows per rank, so that the
call is nothing but the three exchanges; its bytes are the states every rank sends.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaclm_ext import distributed as mdist
from metaclm_ext.store import HistoryStore, HistoryWriter

WIDTH, HEADS, K, LABELS, QUERIES = 64, 8, 10, 280, 64


def write_store(path: Path, rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    fields = {"history": (WIDTH, "float16"), "inputs": (WIDTH, "float16"), "errors": (WIDTH, "float16")}
    with HistoryWriter.create(path, fields=fields, columns={"labels": "int64"}, shard_rows=65536) as w:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            w.append({**{name: torch.randn(n, WIDTH, generator=gen).half().numpy() for name in fields},
                      "labels": torch.randint(0, LABELS, (n,), generator=gen).numpy()})


def operators(part, queries):
    """name -> a call of the distributed operator on this rank's part, and the bytes of its state."""
    q_dual = queries.reshape(QUERIES, WIDTH)
    return {
        "history_topk": (lambda: mdist.history_topk(queries, part["history"], K),
                         QUERIES * HEADS * K * (4 + 8) * 2),
        "history_label_mass": (lambda: mdist.history_label_mass(queries, part["history"], part["labels"], LABELS),
                               QUERIES * HEADS * LABELS * 8),
        "dual_form_apply": (lambda: mdist.dual_form_apply(q_dual, part["inputs"], part["errors"]),
                            QUERIES * WIDTH * 8),
    }


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(call, repeats: int) -> dict:
    """Wall seconds per call and CPU seconds per call (all threads of the rank), each the slowest rank's.

    On a machine whose cores other work keeps busy, the wall time shows the contention; the CPU time
    shows how the work divides between the ranks whatever the contention."""
    call()  # warm: page cache, thread pools, first collectives
    wall, cpu = [], []
    for _ in range(repeats):
        dist.barrier()
        began, began_cpu = time.perf_counter(), time.process_time()
        call()
        cpu.append(slowest(time.process_time() - began_cpu))
        wall.append(slowest(time.perf_counter() - began))
    return {"wall": wall, "cpu": cpu}


def rank_main(rank: int, world: int, port: int, store_path: str, repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    store = HistoryStore(store_path)
    start, stop = mdist.split_store(store, world)[rank]
    queries = torch.randn(QUERIES, HEADS, WIDTH // HEADS, generator=torch.Generator().manual_seed(1))
    out = {"world": world, "rows": len(store), "parts": mdist.split_store(store, world), "ops": {}, "memory": {},
           "merge": {}}
    part = store.rows(start, stop)
    for name, (call, state_bytes) in operators(part, queries).items():
        out["ops"][name] = timed(call, repeats)
    in_memory = {name: torch.from_numpy(part[name].read()) for name in ("history", "inputs", "errors", "labels")}
    for name, (call, state_bytes) in operators(in_memory, queries).items():
        out["memory"][name] = timed(call, repeats)
    tiny = store.rows(rank * K, (rank + 1) * K)  # k rows per rank: the call is its exchanges
    for name, (call, state_bytes) in operators(tiny, queries).items():
        out["merge"][name] = {**timed(call, max(5, repeats)), "state_bytes_per_rank": state_bytes}
    if rank == 0:
        results.put(out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, store_path: Path, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(rank_main, args=(world, free_port(), str(store_path), repeats, results), nprocs=world,
                       start_method="spawn")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for the store (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = (args.out or Path(tmp)) / "bench-store"
        if not (store_path / "manifest.json").exists():
            write_store(store_path, args.rows)
        runs = {world: run(world, store_path, args.repeats) for world in args.ranks}
    base = runs[min(runs)]
    print(f"{args.rows} rows, {WIDTH} fp16 per field; {QUERIES} queries of {HEADS} heads; one thread per rank")
    print(f"{'operator, history, clock':<34}" + "".join(f"{f'{w} rank(s) s':>14}" for w in runs) + "".join(
        f"{f'speedup x{w}':>12}" for w in runs if w != min(runs)))
    for clock in ("wall", "cpu"):
        for source, label in (("ops", "store"), ("memory", "in memory")):
            for name in base[source]:
                medians = {w: statistics.median(r[source][name][clock]) for w, r in runs.items()}
                print(f"{f'{name} {label} {clock}':<34}" + "".join(f"{medians[w]:>14.4f}" for w in runs) + "".join(
                    f"{medians[min(runs)] / medians[w]:>12.2f}" for w in runs if w != min(runs)))
    print(f"merge ({K} rows per rank: the call is its three exchanges)")
    for w, r in runs.items():
        for name, m in r["merge"].items():
            print(f"  {w} rank(s) {name:<20} {statistics.median(m['wall']) * 1e3:8.2f} ms, "
                  f"state {m['state_bytes_per_rank'] / 1024:8.1f} KiB per rank")
    if args.json:
        args.json.write_text(json.dumps({str(w): r for w, r in runs.items()}, indent=1, default=float))


if __name__ == "__main__":
    main()
