#!/usr/bin/env python
"""Where the attention stage of `metaclm analyze` spends its time, per field and per checkpoint.

On a run of `metaclm train --record-history` it rebuilds the analysis' queries (the validation queries of
every checkpoint after epoch 0, with the checkpoint's row count as their limit), then times per field:

* ``read``: streaming the field from a freshly opened store with its checksums (``iter_chunks``, the
  chunks dropped), and ``read_unverified`` the same with ``verify=False``: the difference is the CRC-32;
* ``memory``: the same ``history_topk`` call as the analysis on the field already in memory;
* ``streamed``: that call on the field of a freshly opened store, as the analysis makes it;
* ``python``: the analysis' numpy work on the result (same-label shares of the three labels);
* ``per_checkpoint`` (with ``--per-checkpoint``): one call per checkpoint's 200 queries on its rows only.

Every part is timed ``--repeat`` times, the streamed and in-memory calls alternating, and the minima of wall
and process CPU seconds are kept (the load average is recorded with them: on shared cores only minima
over interleaved runs compare). Writes JSON and prints a table.

    python scripts/profile_attention.py runs/t5 --json profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from metaclm_ext import HistoryStore, history_topk
from metaclm_ext.analyze import attention
from metaclm_ext.analyze.forward import forward_split, lens_model
from metaclm_ext.history_names import parse_field_name
from metaclm_ext.training import epoch_limits, load_checkpoint, load_run


def build_queries(run_dir: str) -> dict:
    """The attention stage's inputs as `metaclm analyze` builds them (every checkpoint after epoch 0)."""
    run = load_run(run_dir)
    epochs = [e for e in run.epochs if e > 0]
    queries: dict[str, list] = {}
    for epoch in epochs:
        stats = forward_split(lens_model(load_checkpoint(run.path, epoch)), run.data["validation"])
        for field, x in stats.cproj_inputs.items():
            queries.setdefault(field, []).append(x)
    store = HistoryStore(run.history)
    by_epoch = epoch_limits(store.read("epoch"), epochs)
    n = len(stats.seed)
    labels = attention.query_labels(stats.seed, stats.next_token, len(run.data["meta"]["vocab"]))
    return {"queries": {f: torch.cat(xs) for f, xs in queries.items()}, "epochs": epochs,
            "limits": np.repeat([by_epoch[e] for e in epochs], n), "per_epoch": n, "heads": run.config.n_head,
            "labels": {name: np.tile(y, len(epochs)) for name, y in labels.items()}, "history": str(run.history)}


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def best(samples: list[tuple[float, float]]) -> dict:
    return {"wall_s": min(s[0] for s in samples), "cpu_s": min(s[1] for s in samples),
            "wall_all_s": [s[0] for s in samples]}


def drain(field) -> None:
    for _ in field.iter_chunks():
        pass


def profile_field(field: str, inputs: dict, repeat: int, per_checkpoint: bool) -> dict:
    """The timings of one field. Every read opens the store afresh, as the analysis reads each field once:
    a store object checks each shard's CRC-32 only on its first pass."""
    q, limits = inputs["queries"][field], torch.as_tensor(inputs["limits"])
    store = HistoryStore(inputs["history"])
    heads = inputs["heads"] if parse_field_name(field).module == "attn" else 1
    in_memory = store.read_tensor(field)
    history_labels = {name: store.read(attention.LABEL_COLUMNS[name]) for name in attention.LABELS}
    groups = np.repeat(np.arange(len(inputs["epochs"])), inputs["per_epoch"])
    samples: dict[str, list] = {key: [] for key in ("read", "read_unverified", "memory", "streamed", "python")}
    result = None
    for _ in range(repeat):  # interleaved: every part once per round
        samples["read"].append(timed(lambda: drain(HistoryStore(inputs["history"])[field])))
        samples["read_unverified"].append(timed(lambda: drain(HistoryStore(inputs["history"], verify=False)[field])))
        samples["memory"].append(timed(lambda: history_topk(q, in_memory, 10, limit=limits, heads=heads)))
        result = history_topk(q, in_memory, 10, limit=limits, heads=heads)
        samples["streamed"].append(timed(
            lambda: history_topk(q, HistoryStore(inputs["history"])[field], 10, limit=limits, heads=heads)))

        def shares():
            for name in attention.LABELS:
                for sel in (result.top, result.last):
                    attention.same_label_percent(sel.indices, history_labels[name], inputs["labels"][name], groups,
                                                 len(inputs["epochs"]))
        samples["python"].append(timed(shares))
    out = {key: best(s) for key, s in samples.items()}
    out.update(queries=int(q.shape[0]), heads=heads, width=int(in_memory.shape[1]), rows=int(in_memory.shape[0]),
               bytes=in_memory.numel() * in_memory.element_size(),
               essential_flops=2.0 * in_memory.shape[1] * float(inputs["limits"].sum()))
    if per_checkpoint:
        n = inputs["per_epoch"]
        calls = []
        for g in range(len(inputs["epochs"])):
            lim = int(inputs["limits"][g * n])
            qg, hg = q[g * n:(g + 1) * n], in_memory[:lim]
            calls.append(best([timed(lambda: history_topk(qg, hg, 10, heads=heads)) for _ in range(repeat)]))
        out["per_checkpoint"] = {"limits": sorted({int(x) for x in inputs["limits"]}),
                                 "wall_s": [c["wall_s"] for c in calls], "cpu_s": [c["cpu_s"] for c in calls],
                                 "sum_wall_s": sum(c["wall_s"] for c in calls)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder of `metaclm train --record-history`")
    ap.add_argument("--fields", default="", help="comma-separated fields (default: every field of the analysis)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of interleaved timings; minima are kept")
    ap.add_argument("--per-checkpoint", action="store_true", help="also one call per checkpoint's queries")
    ap.add_argument("--queries-cache", help="a .pt file for the rebuilt queries (written once, then read)")
    ap.add_argument("--json", help="write the profile here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.queries_cache and os.path.exists(args.queries_cache):
        inputs = torch.load(args.queries_cache, weights_only=False)
    else:
        started = time.perf_counter()
        inputs = build_queries(args.run)
        print(f"queries rebuilt in {time.perf_counter() - started:.1f} s", flush=True)
        if args.queries_cache:
            torch.save(inputs, args.queries_cache)
    fields = [f for f in args.fields.split(",") if f] or list(inputs["queries"])
    report = {"run": args.run, "threads": torch.get_num_threads(), "repeat": args.repeat,
              "load_before": os.getloadavg(), "fields": {}}
    print(f"{'field':<10} {'Q':>6} {'rows':>7} {'read':>7} {'crc':>7} {'memory':>8} {'streamed':>8} {'ratio':>6} "
          f"{'python':>7}  (min wall s; load {os.getloadavg()[0]:.2f})")
    for field in fields:
        r = profile_field(field, inputs, args.repeat, args.per_checkpoint)
        report["fields"][field] = r
        print(f"{field:<10} {r['queries']:>6} {r['rows']:>7} {r['read']['wall_s']:>7.3f} "
              f"{r['read']['wall_s'] - r['read_unverified']['wall_s']:>7.3f} {r['memory']['wall_s']:>8.3f} "
              f"{r['streamed']['wall_s']:>8.3f} {r['streamed']['wall_s'] / r['memory']['wall_s']:>6.2f} "
              f"{r['python']['wall_s']:>7.3f}", flush=True)
    report["load_after"] = os.getloadavg()
    total = {key: sum(r[key]["wall_s"] for r in report["fields"].values())
             for key in ("read", "read_unverified", "memory", "streamed", "python")}
    report["total"] = total
    print(f"total: read {total['read']:.2f} s (unverified {total['read_unverified']:.2f}), in memory "
          f"{total['memory']:.2f} s, streamed {total['streamed']:.2f} s ({total['streamed'] / total['memory']:.2f}x), "
          f"python {total['python']:.2f} s; load {report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
