"""GPU benchmark of the CUDA history kernels, against the device's own bandwidth measured in the same run.

    python scripts/bench_cuda.py [--quick] [--out benchmarks/results]

Measures, on one device: the device-to-device copy bandwidth (a large tensor copy, bytes read + written
per second) and the pinned host-to-device bandwidth; then history_topk (top-k and last-k in one pass)
on in-memory fp16 histories of several head layouts, reported as history bytes per second and as a
fraction of the copy bandwidth, next to chunked torch matmul + topk and (when faiss has GPU support)
faiss.knn_gpu exact search run twice (top, and last via negated queries); history_label_mass; and
history_topk streamed from a CPU row source (TensorRows, i.e. pages already in RAM) against the pinned
host-to-device bandwidth. Writes one JSON file under --out. Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
from tqdm import tqdm

import metaclm_ext
from metaclm_ext.baselines import torch_topk  # the same chunked baseline as the CPU table
from metaclm_ext.ops import TensorRows

# (name, Q, H, Dh, N, k): Q*H up to 1024 query heads, head dims 8 to 128.
CASES = [
    ("attn-8x64", 128, 8, 64, 2_000_000, 32),
    ("attn-16x8", 64, 16, 8, 8_000_000, 32),
    ("attn-4x32", 256, 4, 32, 4_000_000, 32),
    ("ffn-1x128", 16, 1, 128, 4_000_000, 32),
    ("ffn-1x128-k1024", 16, 1, 128, 4_000_000, 1024),
]
QUICK = [(name, q, h, dh, n // 8, k) for name, q, h, dh, n, k in CASES]


def timed(fn, repeat: int = 3) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up, timed with CUDA events."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9


def h2d_bandwidth(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / timed(lambda: dst.copy_(src, non_blocking=True)) / 1e9


def faiss_topk(queries, history, k):
    """A function running faiss exact inner-product search per head, twice (top; last via negated
    queries), or a string saying why there is none."""
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in faiss calls)
    except ImportError as exc:
        return f"faiss not importable: {exc}"
    if not hasattr(faiss, "StandardGpuResources"):
        return "faiss has no GPU support (faiss-cpu installed)"
    res = faiss.StandardGpuResources()
    q, h, dh = queries.shape
    heads = [history.view(-1, h, dh)[:, i].contiguous() for i in range(h)]  # faiss wants dense [N, Dh]
    signed = [[(s * queries[:, i]).half().contiguous() for s in (1, -1)] for i in range(h)]

    def run():
        for i in range(h):
            for xq in signed[i]:
                faiss.knn_gpu(res, xq, heads[i], k, metric=faiss.METRIC_INNER_PRODUCT)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="histories 8x shorter")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                                                      "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: skipped, no CUDA device")
        return 0
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps_read_plus_write": copy_bandwidth(),
        "h2d_pinned_gbps": h2d_bandwidth(),
        "cases": [],
    }
    copy = result["copy_gbps_read_plus_write"]
    for name, q_, h, dh, n, k in tqdm(QUICK if args.quick else CASES, desc="cases"):
        history = torch.randn(n, h * dh, device="cuda").half()
        queries = torch.randn(q_, h, dh, device="cuda")
        labels = torch.randint(0, 64, (n,), device="cuda")
        nbytes = history.numel() * history.element_size()
        ours = metaclm_ext.history_topk(queries, history, k)
        (_, base_top_idx), _ = torch_topk(queries, history, k)
        case = {
            "name": name, "Q": q_, "H": h, "Dh": dh, "N": n, "k": k, "dtype": "float16", "history_bytes": nbytes,
            "topk_s": timed(lambda: metaclm_ext.history_topk(queries, history, k)),
            "torch_matmul_topk_s": timed(lambda: torch_topk(queries, history, k)),
            "label_mass_s": timed(lambda: metaclm_ext.history_label_mass(queries, history, labels, 64)),
            # Sanity: rows picked by both (ties and fp rounding may reorder near-equal scores).
            "top_index_agreement_with_torch": float((ours.top.indices == base_top_idx).float().mean()),
        }
        faiss_run = faiss_topk(queries, history, min(k, 2048))
        try:
            case["faiss_knn_gpu_top_and_last_s"] = timed(faiss_run) if callable(faiss_run) else faiss_run
        except Exception as exc:  # recorded, not fatal: the other numbers of the run still stand
            case["faiss_knn_gpu_top_and_last_s"] = f"faiss failed: {exc}"
        del faiss_run
        case["topk_gbps"] = nbytes / case["topk_s"] / 1e9
        case["topk_fraction_of_copy"] = case["topk_gbps"] / copy
        case["label_mass_gbps"] = nbytes / case["label_mass_s"] / 1e9
        result["cases"].append(case)
        del history, labels
        torch.cuda.empty_cache()
    # Streaming: a CPU history (in RAM, as a store in page cache) through pinned buffers.
    name, q_, h, dh, n, k = (QUICK if args.quick else CASES)[0]
    host = torch.randn(n, h * dh).half()
    queries = torch.randn(q_, h, dh, device="cuda")
    seconds = timed(lambda: metaclm_ext.history_topk(queries, TensorRows(host), k), repeat=2)
    gbps = host.numel() * host.element_size() / seconds / 1e9
    result["streaming"] = {"case": name, "N": n, "seconds": seconds, "gbps": gbps,
                           "fraction_of_h2d_pinned": gbps / result["h2d_pinned_gbps"]}
    os.makedirs(args.out, exist_ok=True)
    slug = result["device"].replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"bench_cuda-{slug}-{result['when'][:10]}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
