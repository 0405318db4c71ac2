"""pytest-benchmark: history_topk streamed from a HistoryStore, next to a plain sequential read of the same
.npy files and the same op on the history in memory, all in one run.

The store holds METACLM_BENCH_ROWS rows (default: a smoke size) x 64 fp16 (an attention input of H = 8
heads of Dh = 8) in shards of 65,536 rows. It is written just before the benchmarks, so every read hits a
WARM PAGE CACHE: the numbers are the streaming machinery's ceiling (copies, CRC-32, threads), not disk
speed. Q = 8 queries keeps the kernel fast enough that reading matters; Q = 200 is the paper's validation
query count, where the kernel dominates. The last test prints GB/s for every row (history bytes / mean time).
"""
import os

import pytest
import torch

import metaclm_ext
from metaclm_ext import HistoryStore, HistoryWriter

K = 10
WIDTH = 64
RESULTS = {}  # name -> GB/s, printed by the summary test


@pytest.fixture(scope="session")
def store_and_history(rows, tmp_path_factory):
    gen = torch.Generator().manual_seed(2)
    history = torch.randn(rows, WIDTH, generator=gen).half()
    path = tmp_path_factory.mktemp("bench") / "store"
    with HistoryWriter.create(path, fields={"attn_in.0": (WIDTH, "float16")}) as w:
        for start in range(0, rows, 1 << 20):
            w.append({"attn_in.0": history[start : start + (1 << 20)]})
    return path, history


def _record(benchmark, name, nbytes):
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        gbps = nbytes / benchmark.stats.stats.mean / 1e9
        benchmark.extra_info["GB_per_s"] = gbps
        RESULTS[name] = gbps


def _sequential_read(paths, verify):
    """Read every file front to back into one reusable buffer (the plain-read ceiling)."""
    import zlib

    buf = bytearray(8 << 20)
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
                if verify:
                    zlib.crc32(view[:n])
    return total


@pytest.mark.benchmark(group="store read (warm page cache)")
@pytest.mark.parametrize("verify", [False, True], ids=["plain", "crc32"])
def test_sequential_read(benchmark, store_and_history, verify):
    path, history = store_and_history
    paths = sorted((path / "data" / "attn_in.0").glob("*.npy"))
    total = benchmark.pedantic(_sequential_read, args=(paths, verify), rounds=5, warmup_rounds=1)
    assert total == sum(p.stat().st_size for p in paths)
    _record(benchmark, f"sequential read of the .npy files{' + CRC-32' if verify else ''}", history.numel() * 2)


@pytest.mark.benchmark(group="store read (warm page cache)")
@pytest.mark.parametrize("verify", [False, True], ids=["noverify", "verify"])
def test_stream_chunks(benchmark, store_and_history, verify):
    """iter_chunks alone: read-ahead thread, chunk assembly across shards, optional CRC-32."""
    path, history = store_and_history
    field = HistoryStore(path, verify=verify)["attn_in.0"]
    rows = benchmark.pedantic(lambda: sum(c.shape[0] for _, c in field.iter_chunks()), rounds=5, warmup_rounds=1)
    assert rows == history.shape[0]
    _record(benchmark, f"store iter_chunks{'' if verify else ' (verify=False)'}", history.numel() * 2)


@pytest.mark.parametrize("queries", [8, 200])
@pytest.mark.parametrize("source", ["store", "store-noverify", "memory"])
def test_topk(benchmark, store_and_history, source, queries):
    path, history = store_and_history
    benchmark.group = f"history_topk Q={queries} H=8 Dh=8 fp16 (warm page cache)"
    q = torch.randn(queries, 8, 8, generator=torch.Generator().manual_seed(queries))
    data = history if source == "memory" else HistoryStore(path, verify=source == "store")["attn_in.0"]
    res = benchmark.pedantic(metaclm_ext.history_topk, args=(q, data, K), rounds=3, warmup_rounds=1)
    want = metaclm_ext.history_topk(q, history, K)  # a fast wrong stream cannot pass
    assert torch.equal(res.top.indices, want.top.indices) and torch.equal(res.last.values, want.last.values)
    _record(benchmark, f"history_topk Q={queries} from {source}", history.numel() * 2)


def test_summary(rows, capsys):
    """Print the GB/s of everything above (history bytes / mean time)."""
    if not RESULTS:  # --benchmark-disable: nothing was timed
        return
    with capsys.disabled():
        print(f"\nstore benchmarks, N = {rows:,} rows x {WIDTH} fp16 = {rows * WIDTH * 2 / 1e9:.3f} GB, "
              f"warm page cache, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs:")
        for name, gbps in RESULTS.items():
            print(f"  {name:<48} {gbps:7.2f} GB/s")
